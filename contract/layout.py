"""A job's parallel layout (tp × pp × dp) and the rules its model and batch put on it, in one place.

Spec validation (contract.spec) and the planner (which picks a smaller layout when ranks are short) both ask
`layout_violations`; nothing else writes these rules down. Each violation names the field a user would
change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract.errors import FieldViolation

if TYPE_CHECKING:
    from contract.spec import ModelSpec, TrainingSpec

# Past this many ranks a layout is a typo, not a plan.
MAX_RANKS = 1 << 13


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"


def layout_violations(layout: Layout, model: ModelSpec, training: TrainingSpec) -> list[FieldViolation]:
    """Why the model and batch cannot run at `layout` (empty: they can).

    Tensor parallelism splits attention heads and the vocabulary, pipeline parallelism whole layers, and
    data parallelism the global batch into micro-batches."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    out: list[FieldViolation] = []
    if model.heads % tp:
        out.append(FieldViolation("model.heads", f"{model.heads} heads are not divisible by parallelism.tp={tp}"))
    if model.vocab_size % tp:
        out.append(FieldViolation("model.vocab_size",
                                  f"{model.vocab_size} is not divisible by parallelism.tp={tp}"))
    if model.layers % pp:
        out.append(FieldViolation("model.layers", f"{model.layers} layers are not divisible by parallelism.pp={pp}"))
    if training.global_batch_size % (training.micro_batch_size * dp):
        out.append(FieldViolation(
            "training.global_batch_size",
            f"{training.global_batch_size} is not divisible by training.micro_batch_size*parallelism.dp = "
            f"{training.micro_batch_size}*{dp}"))
    if layout.world_size > MAX_RANKS:
        out.append(FieldViolation("parallelism", f"tp*pp*dp = {layout.world_size} exceeds {MAX_RANKS} ranks"))
    return out


def valid_layouts(model: ModelSpec, training: TrainingSpec, most: int) -> list[Layout]:
    """Every layout of at most `most` ranks that `layout_violations` accepts, smallest tp, pp, dp first.

    Candidates are only the divisors each rule could accept (tp of heads, pp of layers, dp of the number of
    micro-batches), so the search stays small; the rules themselves decide."""
    candidates = (Layout(tp, pp, dp)
                  for tp in _divisors(model.heads)
                  for pp in _divisors(model.layers)
                  for dp in _divisors(training.global_batch_size // training.micro_batch_size))
    return [layout for layout in candidates
            if layout.world_size <= most and not layout_violations(layout, model, training)]


def describe_rules(model: ModelSpec, training: TrainingSpec) -> str:
    """The rules above in words, with this model's numbers (for a planner's "no layout fits" message)."""
    return (f"tp must divide heads={model.heads} and vocab_size={model.vocab_size}, pp must divide "
            f"layers={model.layers}, micro_batch_size*dp must divide global_batch_size={training.global_batch_size}")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
