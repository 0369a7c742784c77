"""A sweep: what users write to tune hyperparameters on a small µP proxy and train the target with the best
of them. Like the job spec, it is checked once at the edge (the CLI for a file, CreateSweep) and refused with
each offending field named; the pure rules the sweep controller and the service layer share live here too:
the grid's trials and their names, a trial's objective and the choice of the best point.

The stored form (`SweepSpec.to_dict`) has the proto's field names, so a row turns into a message directly."""

from __future__ import annotations

import itertools
import math
import re
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


from contract.errors import FieldViolation, SpecError
from contract.spec import JobSpec, _message_to_dict, _unknown_field_paths, dict_to_message, parse_spec
from contract.yaml_file import load_yaml_file
from roundhouse.v1 import sweep_pb2

# A sweep's trials are jobs "{name}-t{index}" and its target "{name}-target": with a job name's 63 characters
# that leaves 48 for the sweep and 999 trials.
MAX_NAME = 48
MAX_TRIALS = 999
MAX_EVAL_WINDOWS = 1000
DEFAULT_EVAL_WINDOWS = 3
DEFAULT_MAX_PARALLEL = 1
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # used with fullmatch
# Scalar hyperparameters a grid may vary besides learning rate, weight decay and seed: those µP transfers
# across widths (the multipliers are width-independent by construction; warmup is counted in steps).
EXTRA_HYPERPARAMETERS = ("model.mup.output_multiplier", "model.mup.attention_multiplier", "training.warmup_steps")
# A label on every trial and the target: the sweep that owns it (jobs can be listed by it).
SWEEP_LABEL = "roundhouse.io/sweep"


@dataclass(frozen=True)
class GridPoint:
    """One combination of the grid's values (seeds aside): what the target inherits if it wins."""

    learning_rate: float
    weight_decay: float
    hyperparameters: tuple[tuple[str, float], ...] = ()  # (field, value), in the grid's order


@dataclass(frozen=True)
class TrialPlan:
    index: int
    point: GridPoint
    seed: int


@dataclass
class SweepSpec:
    name: str
    proxy: JobSpec
    target: JobSpec
    learning_rates: list[float]
    weight_decays: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    hyperparameters: list[tuple[str, list[float]]] = field(default_factory=list)
    max_parallel: int = DEFAULT_MAX_PARALLEL
    eval_windows: int = DEFAULT_EVAL_WINDOWS

    def trials(self) -> list[TrialPlan]:
        """Every trial, in grid order: learning rate slowest, then weight decay, the other hyperparameters,
        and seed fastest. The order (and so each trial's index and name) depends on the spec alone."""
        decays = self.weight_decays or [self.proxy.training.weight_decay]
        seeds = self.seeds or [self.proxy.training.seed]
        fields = [f for f, _ in self.hyperparameters]
        points = [GridPoint(lr, wd, tuple(zip(fields, extra))) for lr, wd, *extra in
                  itertools.product(self.learning_rates, decays, *(v for _, v in self.hyperparameters))]
        return [TrialPlan(index, point, seed)
                for index, (point, seed) in enumerate(itertools.product(points, seeds))]

    def trial_job_name(self, index: int) -> str:
        return trial_job_name(self.name, index)

    @property
    def target_job_name(self) -> str:
        return target_job_name(self.name)

    def trial_spec(self, plan: TrialPlan) -> JobSpec:
        """The proxy at this trial's point and seed, named and labelled for the sweep."""
        data = self.proxy.model_dump(mode="json", exclude_none=True)
        data["name"] = self.trial_job_name(plan.index)
        data["training"]["seed"] = plan.seed
        return parse_spec(_with_point(data, plan.point, self.name))

    def target_spec(self, point: GridPoint) -> JobSpec:
        """The target with the chosen point's hyperparameters (its own seed and everything else)."""
        data = self.target.model_dump(mode="json", exclude_none=True)
        data["name"] = self.target_job_name
        return parse_spec(_with_point(data, point, self.name))

    def to_dict(self) -> dict[str, Any]:
        """The stored form, with the proto's field names."""
        return {
            "name": self.name,
            "proxy": self.proxy.model_dump(mode="json", exclude_none=True),
            "target": self.target.model_dump(mode="json", exclude_none=True),
            "grid": {"learning_rates": list(self.learning_rates), "weight_decays": list(self.weight_decays),
                     "seeds": list(self.seeds),
                     "hyperparameters": [{"field": f, "values": list(v)} for f, v in self.hyperparameters]},
            "max_parallel": self.max_parallel,
            "objective": {"eval_windows": self.eval_windows},
        }


def trial_job_name(sweep: str, index: int) -> str:
    return f"{sweep}-t{index}"


def target_job_name(sweep: str) -> str:
    return f"{sweep}-target"


# -- parsing and validation --------------------------------------------------------------------------------


def parse_sweep(data: Any, check_points: bool = True) -> tuple[SweepSpec, list[str]]:
    """Validates a sweep given as plain data (YAML, a stored row, a message turned to a dict); returns it with
    its warnings, or raises SpecError naming every offending field (paths relative to the sweep spec).
    `check_points=False` skips checking every trial's and the target's spec one by one: for a stored sweep,
    checked when it was created."""
    if not isinstance(data, dict):
        raise SpecError([FieldViolation("", "a sweep spec must be a mapping")])
    out: list[FieldViolation] = []
    unknown = sorted(set(data) - {"name", "proxy", "target", "grid", "max_parallel", "objective"})
    out += [FieldViolation(k, "unknown field") for k in unknown]

    name = data.get("name")
    if not isinstance(name, str) or len(name) > MAX_NAME or not _DNS_LABEL.fullmatch(name):
        out.append(FieldViolation("name", f"must be an RFC 1123 label of at most {MAX_NAME} characters "
                                          "(lower-case letters, digits and '-')"))
        name = "sweep"

    proxy = _job_spec(data.get("proxy"), "proxy", trial_job_name(name, 0), out)
    target = _job_spec(data.get("target"), "target", target_job_name(name), out)

    grid = data.get("grid")
    if not isinstance(grid, dict):
        out.append(FieldViolation("grid", "required: a mapping with learning_rates"))
        grid = {}
    out += [FieldViolation(f"grid.{k}", "unknown field")
            for k in sorted(set(grid) - {"learning_rates", "weight_decays", "seeds", "hyperparameters"})]
    learning_rates = _numbers(grid.get("learning_rates"), "grid.learning_rates", out, required=True,
                              positive=True)
    weight_decays = _numbers(grid.get("weight_decays"), "grid.weight_decays", out)
    seeds = _numbers(grid.get("seeds"), "grid.seeds", out, integers=True)
    hyperparameters = _hyperparameters(grid.get("hyperparameters"), out)
    max_parallel = _count(data.get("max_parallel"), "max_parallel", DEFAULT_MAX_PARALLEL, MAX_TRIALS, out)
    objective = data.get("objective") or {}
    if not isinstance(objective, dict):
        out.append(FieldViolation("objective", "must be a mapping"))
        objective = {}
    out += [FieldViolation(f"objective.{k}", "unknown field") for k in sorted(set(objective) - {"eval_windows"})]
    eval_windows = _count(objective.get("eval_windows"), "objective.eval_windows", DEFAULT_EVAL_WINDOWS,
                          MAX_EVAL_WINDOWS, out)
    if out:
        raise SpecError(out)

    spec = SweepSpec(name, proxy, target, learning_rates, weight_decays, [int(s) for s in seeds], hyperparameters,
                     max_parallel, eval_windows)
    out += _mup_violations(spec)
    out += _objective_violations(spec)
    trials = len(learning_rates) * max(1, len(weight_decays)) * max(1, len(seeds)) * math.prod(
        len(v) for _, v in hyperparameters)
    if trials > MAX_TRIALS:
        out.append(FieldViolation("grid", f"{trials} trials; at most {MAX_TRIALS}"))
    if out:
        raise SpecError(out)
    if check_points:
        out += _point_violations(spec)  # a grid value may make a trial or the target invalid
    if out:
        raise SpecError(out)
    return spec, transfer_warnings(spec)


def stored_sweep(data: dict[str, Any]) -> SweepSpec:
    """A sweep as the control plane stored it (`SweepSpec.to_dict`, validated when it was created)."""
    return parse_sweep(data, check_points=False)[0]


def sweep_from_proto(message: sweep_pb2.SweepSpec) -> tuple[SweepSpec, list[str]]:
    unknown = _unknown_field_paths(message, "")
    if unknown:
        raise SpecError([FieldViolation(p, "unknown field") for p in unknown])
    grid = message.grid
    data: dict[str, Any] = {"name": message.name, "grid": {
        "learning_rates": list(grid.learning_rates), "weight_decays": list(grid.weight_decays),
        "seeds": list(grid.seeds),
        "hyperparameters": [{"field": h.field, "values": list(h.values)} for h in grid.hyperparameters]}}
    for section in ("proxy", "target"):
        if message.HasField(section):
            data[section] = _message_to_dict(getattr(message, section))
    if message.HasField("max_parallel"):
        data["max_parallel"] = message.max_parallel
    if message.objective.HasField("eval_windows"):
        data["objective"] = {"eval_windows": message.objective.eval_windows}
    return parse_sweep(data)


def sweep_to_proto(spec: SweepSpec) -> sweep_pb2.SweepSpec:
    return sweep_dict_to_proto(spec.to_dict())


def sweep_dict_to_proto(data: dict[str, Any]) -> sweep_pb2.SweepSpec:
    """The message of a stored sweep spec (`SweepSpec.to_dict`)."""
    message = sweep_pb2.SweepSpec(name=data["name"], max_parallel=data["max_parallel"])
    dict_to_message(data["proxy"], message.proxy)
    dict_to_message(data["target"], message.target)
    grid = data["grid"]
    message.grid.learning_rates.extend(grid["learning_rates"])
    message.grid.weight_decays.extend(grid["weight_decays"])
    message.grid.seeds.extend(grid["seeds"])
    for item in grid["hyperparameters"]:
        message.grid.hyperparameters.add(field=item["field"], values=item["values"])
    message.objective.eval_windows = data["objective"]["eval_windows"]
    return message


def load_sweep_file(path: str) -> tuple[SweepSpec, list[str]]:
    """The spec in a YAML file (contract.yaml_file: UTF-8, no duplicate keys), validated."""
    data = load_yaml_file(path)
    return parse_sweep({} if data is None else data)


def transfer_warnings(spec: SweepSpec) -> list[str]:
    """What µP does not promise to transfer: it transfers width; depth, sequence length and vocabulary should
    match the target's."""
    p, t = spec.proxy.model, spec.target.model
    return [f"{what}: proxy {a} differs from target {b} (µP transfers hyperparameters across width only)"
            for what, a, b in (("model.layers", p.layers, t.layers), ("model.seq_length", p.seq_length, t.seq_length),
                               ("model.vocab_size", p.vocab_size, t.vocab_size)) if a != b]


# -- the objective and the choice (shared by the controller and the service layer) ---------------------------


def trial_objective(val_losses: Sequence[float | None], windows: int) -> float:
    """The mean validation loss of the last `windows` evaluations (oldest first in `val_losses`), or +inf when
    there is none or any of them is not finite."""
    last = list(val_losses)[-windows:]
    if not last or any(v is None or not math.isfinite(v) for v in last):
        return math.inf
    return sum(last) / len(last)


def choose_best(points: Sequence[tuple[GridPoint, float]]) -> tuple[GridPoint, float] | None:
    """The point with the lowest objective (NaN counts as +inf); ties go to the smaller learning rate, then to
    the earlier point in grid order. None if no point has a finite objective."""
    best = None
    for order, (point, objective) in enumerate(points):
        value = objective if math.isfinite(objective) else math.inf
        key = (value, point.learning_rate, order)
        if best is None or key < best[0]:
            best = (key, point, value)
    if best is None or not math.isfinite(best[2]):
        return None
    return best[1], best[2]


def point_objectives(trials: Sequence[tuple[TrialPlan, float]]) -> list[tuple[GridPoint, float]]:
    """Each grid point's objective, the mean over its seeds' trials (+inf if any of them is), in grid order."""
    by_point: dict[GridPoint, list[float]] = {}
    for plan, objective in trials:
        by_point.setdefault(plan.point, []).append(objective)
    return [(point, sum(v) / len(v) if all(math.isfinite(x) for x in v) else math.inf)
            for point, v in by_point.items()]


def model_flops(spec: JobSpec, steps: int) -> float:
    """Training FLOPs of `steps` steps, estimated as 6 · parameters · tokens (parameters: 12·L·d² for the blocks
    plus the embedding and readout V·d each)."""
    m = spec.model
    parameters = 12 * m.layers * m.hidden_size ** 2 + 2 * m.vocab_size * m.hidden_size
    return 6.0 * parameters * steps * spec.training.global_batch_size * m.seq_length


# -- helpers -----------------------------------------------------------------------------------------------


def _with_point(data: dict[str, Any], point: GridPoint, sweep: str) -> dict[str, Any]:
    data["training"]["learning_rate"] = point.learning_rate
    data["training"]["weight_decay"] = point.weight_decay
    for path, value in point.hyperparameters:
        *parents, leaf = path.split(".")
        section = data
        for key in parents:
            section = section.setdefault(key, {})
        section[leaf] = int(value) if leaf == "warmup_steps" else value
    data["labels"] = {**data.get("labels", {}), SWEEP_LABEL: sweep}
    return data


def _job_spec(value: Any, where: str, name: str, out: list[FieldViolation]) -> JobSpec | None:
    if not isinstance(value, dict):
        out.append(FieldViolation(where, "required: a job spec"))
        return None
    try:
        return parse_spec({**value, "name": name})
    except SpecError as exc:
        out += [FieldViolation(f"{where}.{v.field}" if v.field else where, v.description) for v in exc.violations]
        return None


def _numbers(value: Any, where: str, out: list[FieldViolation], required: bool = False, positive: bool = False,
             integers: bool = False) -> list:
    if value is None or value == []:
        if required:
            out.append(FieldViolation(where, "required: at least one value"))
        return []
    if not isinstance(value, list):
        out.append(FieldViolation(where, "must be a list"))
        return []
    if len(value) > MAX_TRIALS:
        out.append(FieldViolation(where, f"{len(value)} values; at most {MAX_TRIALS} (the most trials a sweep has)"))
        return []
    kind = int if integers else (int, float)
    numbers = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or (positive and v <= 0):
            what = "an integer" if integers else ("a positive number" if positive else "a finite number")
            out.append(FieldViolation(f"{where}[{i}]", f"{_shown(v)} is not {what}"))
        else:
            numbers.append(v if integers else float(v))
    if len(set(numbers)) != len(numbers):
        out.append(FieldViolation(where, "has a value twice"))
    return numbers


def _hyperparameters(value: Any, out: list[FieldViolation]) -> list[tuple[str, list[float]]]:
    if value is None:
        return []
    if not isinstance(value, list):
        out.append(FieldViolation("grid.hyperparameters", "must be a list of {field, values}"))
        return []
    if len(value) > len(EXTRA_HYPERPARAMETERS):
        out.append(FieldViolation("grid.hyperparameters", f"{len(value)} entries; at most "
                                                          f"{len(EXTRA_HYPERPARAMETERS)}, one per field"))
        return []
    result, seen = [], set()
    for i, item in enumerate(value):
        where = f"grid.hyperparameters[{i}]"
        if not isinstance(item, dict) or set(item) - {"field", "values"}:
            out.append(FieldViolation(where, "must be a mapping with field and values"))
            continue
        name = item.get("field")
        if name not in EXTRA_HYPERPARAMETERS:
            out.append(FieldViolation(f"{where}.field", f"{_shown(name)} is not one of "
                                                        f"{', '.join(EXTRA_HYPERPARAMETERS)}"))
            continue
        if name in seen:
            out.append(FieldViolation(f"{where}.field", f"{name} is swept twice"))
        seen.add(name)
        values = _numbers(item.get("values"), f"{where}.values", out, required=True)
        result.append((name, values))
    return result


def _count(value: Any, where: str, default: int, most: int, out: list[FieldViolation]) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        out.append(FieldViolation(where, f"{_shown(value)} must be an integer in [1, {most}]"))
        return default
    return value


# What a refusal shows of a value it quotes: a short repr, whatever the value (a YAML alias can make a small
# file into a huge structure).
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxdict = 4
_SHOWN.maxlevel = 2


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def _mup_violations(spec: SweepSpec) -> list[FieldViolation]:
    p, t = spec.proxy.model.mup, spec.target.model.mup
    out = []
    if p is None:
        out.append(FieldViolation("proxy.model.mup", "required: hyperparameters transfer only under µP"))
    if t is None:
        out.append(FieldViolation("target.model.mup", "required: hyperparameters transfer only under µP"))
    if p is None or t is None:
        return out
    if p.base_hidden_size != t.base_hidden_size:
        out.append(FieldViolation("target.model.mup.base_hidden_size",
                                  f"{t.base_hidden_size} differs from proxy.model.mup.base_hidden_size="
                                  f"{p.base_hidden_size}: both must use the same base"))
    if p.base_head_dim != t.base_head_dim:
        out.append(FieldViolation("target.model.mup.base_head_dim",
                                  f"{t.base_head_dim} differs from proxy.model.mup.base_head_dim={p.base_head_dim}: "
                                  "both must use the same base"))
    return out


def _objective_violations(spec: SweepSpec) -> list[FieldViolation]:
    t = spec.proxy.training
    if t.eval_interval == 0:
        return [FieldViolation("proxy.training.eval_interval", "must be positive: the objective is the proxy's "
                                                               "validation loss")]
    if t.steps // t.eval_interval < spec.eval_windows:
        return [FieldViolation("objective.eval_windows",
                               f"{spec.eval_windows} evaluations, but the proxy evaluates only "
                               f"{t.steps // t.eval_interval} times (training.steps / training.eval_interval)")]
    return []


def _point_violations(spec: SweepSpec) -> list[FieldViolation]:
    """A grid value the spec refuses (a learning rate above its limit, say), named by the grid field."""
    out = []
    for plan in spec.trials():
        try:
            spec.trial_spec(plan)
        except SpecError as exc:
            out += [FieldViolation(_GRID_FIELD_OF.get(v.field, "grid"), f"trial {plan.index} "
                                   f"({_describe(plan.point)}): {v}") for v in exc.violations]
            break
    for point in dict.fromkeys(plan.point for plan in spec.trials()):
        try:
            spec.target_spec(point)
        except SpecError as exc:
            out += [FieldViolation(_GRID_FIELD_OF.get(v.field, "grid"), f"the target at ({_describe(point)}): {v}")
                    for v in exc.violations]
            break
    return out


# The grid field a trial spec's violation comes from.
_GRID_FIELD_OF = {"training.learning_rate": "grid.learning_rates", "training.weight_decay": "grid.weight_decays",
                  "training.seed": "grid.seeds", **{f: "grid.hyperparameters" for f in EXTRA_HYPERPARAMETERS}}


def _describe(point: GridPoint) -> str:
    extra = "".join(f", {f}={v:g}" for f, v in point.hyperparameters)
    return f"learning_rate={point.learning_rate:g}, weight_decay={point.weight_decay:g}{extra}"
