"""The planner: which parallel layout an attempt runs at, given how many ranks can be started now.

A job asks for `resources.ranks` (= tp*pp*dp of its spec) and accepts as few as `resources.min_ranks`.
When fewer ranks than it asks for are available, the planner picks another valid layout and the job
resumes from its newest checkpoint reshaped to it. A job that declares `resources.accelerator_memory` is also
sized at each layout (contract.sizing): a layout where its model fits neither with nor without the optimizer
state offloaded is never chosen, and at one where it fits only offloaded the ranks run with
training.offload.mode interleaved (instead of none). Pure functions: no database, no launcher."""

from __future__ import annotations

import math
from dataclasses import dataclass

from contract.layout import Layout, describe_rules, layout_violations
from contract.layout import valid_layouts as _valid_layouts
from contract.sizing import fit_at
from contract.spec import JobSpec, ParallelismSpec, offload_mode_at


@dataclass(frozen=True)
class LayoutPlan:
    tp: int
    pp: int
    dp: int
    reason: str  # why this layout, for the attempt's event
    offload: str | None = None  # why the planner switched the optimizer-state offload on here (None: it did not)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


class NoLayout(Exception):
    """No valid layout fits the ranks available now; `reason` says what was available and needed."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def plan_layout(spec: JobSpec, available: int | None) -> LayoutPlan:
    """The layout for the next attempt when `available` ranks can be started (None: no limit).

    With enough ranks, the spec's own layout. Otherwise the best valid layout with between
    resources.min_ranks and `available` ranks where the model fits the declared accelerator memory (if any):
    the most ranks; then the one that keeps the spec's tp, then its pp (the least change to how the model is
    split); then the fewest pipeline stages (less bubble)."""
    p = spec.parallelism
    if available is None or available >= p.world_size:
        enough = "no limit on ranks" if available is None else f"{available} ranks available"
        return _plan(spec, (p.tp, p.pp, p.dp), f"the job's own layout ({enough})")
    min_ranks = _min_ranks(spec)
    if available < min_ranks:
        raise NoLayout(f"{available} of {p.world_size} ranks available; the job needs at least {min_ranks} "
                       f"(resources.min_ranks)")
    candidates = [layout for layout in valid_layouts(spec) if min_ranks <= math.prod(layout) <= available]
    if not candidates:
        raise NoLayout(f"{available} of {p.world_size} ranks available, and no valid layout has between "
                       f"{min_ranks} and {available} ranks ({_rules(spec)})")
    fitting = [layout for layout in candidates if offload_mode_at(spec, Layout(*layout)) is not None]
    if not fitting:
        preferred = min(candidates, key=lambda layout: _preference(spec, layout))
        fit = fit_at(spec.model, spec.training, Layout(*preferred), spec.resources.accelerator_memory)
        raise NoLayout(f"{available} of {p.world_size} ranks available, and at no valid layout of between "
                       f"{min_ranks} and {available} ranks does the model fit resources.accelerator_memory="
                       f"{spec.resources.accelerator_memory}, even with its optimizer state offloaded: "
                       f"{fit.describe()}")
    chosen = min(fitting, key=lambda layout: _preference(spec, layout))
    why = _why(spec, chosen, available)
    passed_over = sorted((layout for layout in candidates if layout not in fitting
                          and _preference(spec, layout) < _preference(spec, chosen)),
                         key=lambda layout: _preference(spec, layout))
    if passed_over:
        others = f" (and {len(passed_over) - 1} more)" if len(passed_over) > 1 else ""
        why += (f"; passed over {Layout(*passed_over[0])}{others}: the model does not fit "
                f"resources.accelerator_memory={spec.resources.accelerator_memory} there even with its optimizer "
                "state offloaded")
    return _plan(spec, chosen, why)


def fewest_ranks(spec: JobSpec) -> int:
    """The fewest ranks `plan_layout` starts the job with: it plans for any `available` of at least this many
    and raises NoLayout below (more ranks only add candidate layouts). Lets the job controller pass over a
    waiting job that cannot use the ranks free now without planning it."""
    p = spec.parallelism
    min_ranks = _min_ranks(spec)
    smaller = [math.prod(layout) for layout in valid_layouts(spec)
               if min_ranks <= math.prod(layout) < p.world_size and offload_mode_at(spec, Layout(*layout)) is not None]
    return min(smaller, default=p.world_size)


def _plan(spec: JobSpec, layout: tuple[int, int, int], reason: str) -> LayoutPlan:
    """The plan at `layout`, saying why when the planner offloads the optimizer state there."""
    tp, pp, dp = layout
    offload = None
    if offload_mode_at(spec, Layout(tp, pp, dp)) != spec.training.offload.mode:
        fit = fit_at(spec.model, spec.training, Layout(tp, pp, dp), spec.resources.accelerator_memory)
        offload = (f"training.offload.mode interleaved: the model fits resources.accelerator_memory="
                   f"{spec.resources.accelerator_memory} only with its optimizer state offloaded; {fit.describe()}")
    return LayoutPlan(tp, pp, dp, reason, offload)


def valid_layouts(spec: JobSpec) -> list[tuple[int, int, int]]:
    """Every (tp, pp, dp) of at most the spec's ranks that the model and batch allow (contract.layout's rules,
    the same the spec was validated by)."""
    return [(layout.tp, layout.pp, layout.dp)
            for layout in _valid_layouts(spec.model, spec.training, most=spec.world_size)]


def spec_at_layout(spec: JobSpec, tp: int, pp: int, dp: int) -> JobSpec:
    """The spec an attempt's ranks run: the job's (already validated) spec at the attempt's layout, with
    resources.ranks its world size (the trainer checks that WORLD_SIZE equals tp*pp*dp of the spec it is
    given). Only the layout changes, and the offload mode where the declared accelerator memory holds the model
    only offloaded (as `plan_layout` said), so only the layout and sizing rules are checked again: no dump and
    re-parse."""
    layout = Layout(tp, pp, dp)
    problems = [str(p) for p in layout_violations(layout, spec.model, spec.training)]
    offload_mode = offload_mode_at(spec, layout) if not problems else None
    if not problems and offload_mode is None:
        fit = fit_at(spec.model, spec.training, layout, spec.resources.accelerator_memory)
        problems.append(f"resources.accelerator_memory: {spec.resources.accelerator_memory} per rank cannot hold "
                        f"the model even with its optimizer state offloaded: {fit.describe()}")
    if problems:
        raise ValueError(f"{spec.name} cannot run at {layout}: " + "; ".join(problems))
    world_size = layout.world_size
    resources = spec.resources.model_copy(update={"ranks": world_size,
                                                  "min_ranks": min(_min_ranks(spec), world_size)})
    update = {"parallelism": ParallelismSpec(tp=tp, pp=pp, dp=dp), "resources": resources}
    if offload_mode != spec.training.offload.mode:
        offload = spec.training.offload.model_copy(update={"mode": offload_mode})
        update["training"] = spec.training.model_copy(update={"offload": offload})
    return spec.model_copy(update=update)


def _min_ranks(spec: JobSpec) -> int:
    return spec.resources.min_ranks or spec.resources.ranks or spec.world_size


def _preference(spec: JobSpec, layout: tuple[int, int, int]) -> tuple:
    """Sort key, best first. The last two terms only make the choice deterministic."""
    tp, pp, dp = layout
    p = spec.parallelism
    return (-tp * pp * dp, tp != p.tp, pp != p.pp, pp, abs(tp - p.tp), tp)


def _why(spec: JobSpec, layout: tuple[int, int, int], available: int) -> str:
    tp, pp, dp = layout
    p = spec.parallelism
    text = f"{available} of {p.world_size} ranks available: tp={tp} pp={pp} dp={dp}"
    if tp * pp * dp < available:
        text += f" ({tp * pp * dp} ranks: the most a valid layout can use)"
    kept = [f"{name}={old}" for name, new, old in (("tp", tp, p.tp), ("pp", pp, p.pp)) if new == old]
    changed = [f"{name} {old}->{new}" for name, new, old in (("tp", tp, p.tp), ("pp", pp, p.pp)) if new != old]
    if kept:
        text += " keeps " + " and ".join(kept)
    if changed:
        text += ("; " if kept else " ") + "changes " + " and ".join(changed)
        text += " (no valid layout of that size keeps " + ("it)" if len(changed) == 1 else "them)")
    return text


def _rules(spec: JobSpec) -> str:
    return describe_rules(spec.model, spec.training)
