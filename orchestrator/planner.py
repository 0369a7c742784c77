"""The planner: which parallel layout an attempt runs at, given how many ranks can be started now.

A job asks for `resources.ranks` (= tp*pp*dp of its spec) and accepts as few as `resources.min_ranks`.
When fewer ranks than it asks for are available, the planner picks another valid layout and the job
resumes from its newest checkpoint reshaped to it. Pure functions: no database, no launcher."""

from __future__ import annotations

import math
from dataclasses import dataclass

from contract.layout import Layout, describe_rules, layout_violations
from contract.layout import valid_layouts as _valid_layouts
from contract.spec import JobSpec, ParallelismSpec


@dataclass(frozen=True)
class LayoutPlan:
    tp: int
    pp: int
    dp: int
    reason: str  # why this layout, for the attempt's event

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
    resources.min_ranks and `available` ranks: the most ranks; then the one that keeps the spec's tp, then
    its pp (the least change to how the model is split); then the fewest pipeline stages (less bubble)."""
    p = spec.parallelism
    if available is None or available >= p.world_size:
        enough = "no limit on ranks" if available is None else f"{available} ranks available"
        return LayoutPlan(p.tp, p.pp, p.dp, f"the job's own layout ({enough})")
    min_ranks = _min_ranks(spec)
    if available < min_ranks:
        raise NoLayout(f"{available} of {p.world_size} ranks available; the job needs at least {min_ranks} "
                       f"(resources.min_ranks)")
    candidates = [layout for layout in valid_layouts(spec) if min_ranks <= math.prod(layout) <= available]
    if not candidates:
        raise NoLayout(f"{available} of {p.world_size} ranks available, and no valid layout has between "
                       f"{min_ranks} and {available} ranks ({_rules(spec)})")
    tp, pp, dp = min(candidates, key=lambda layout: _preference(spec, layout))
    return LayoutPlan(tp, pp, dp, _why(spec, (tp, pp, dp), available))


def valid_layouts(spec: JobSpec) -> list[tuple[int, int, int]]:
    """Every (tp, pp, dp) of at most the spec's ranks that the model and batch allow (contract.layout's rules,
    the same the spec was validated by)."""
    return [(layout.tp, layout.pp, layout.dp)
            for layout in _valid_layouts(spec.model, spec.training, most=spec.world_size)]


def spec_at_layout(spec: JobSpec, tp: int, pp: int, dp: int) -> JobSpec:
    """The spec an attempt's ranks run: the job's (already validated) spec at the attempt's layout, with
    resources.ranks its world size (the trainer checks that WORLD_SIZE equals tp*pp*dp of the spec it is
    given). Only the layout changes, so only the layout rules are checked again: no dump and re-parse."""
    layout = Layout(tp, pp, dp)
    problems = layout_violations(layout, spec.model, spec.training)
    if problems:
        raise ValueError(f"{spec.name} cannot run at {layout}: " + "; ".join(str(p) for p in problems))
    world_size = layout.world_size
    resources = spec.resources.model_copy(update={"ranks": world_size,
                                                  "min_ranks": min(_min_ranks(spec), world_size)})
    return spec.model_copy(update={"parallelism": ParallelismSpec(tp=tp, pp=pp, dp=dp), "resources": resources})


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
