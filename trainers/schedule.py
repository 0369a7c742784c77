"""The learning-rate schedule: linear warmup over `warmup_steps`, then constant, cosine down to 10% of the peak,
or linear down to 0 over the remaining steps. Steps count from 1; step s trains with `lr_at(s)`."""

from __future__ import annotations

import math

from contract.spec import TrainingSpec

COSINE_FLOOR = 0.1


def lr_at(step: int, training: TrainingSpec) -> float:
    peak, warmup, total = training.learning_rate, training.warmup_steps, training.steps
    t = step - 1  # optimizer steps taken before this one
    if t < warmup:
        return peak * (t + 1) / warmup
    if training.lr_schedule == "constant":
        return peak
    progress = min(1.0, (t - warmup) / max(1, total - warmup))  # 0 on the first step after warmup
    if training.lr_schedule == "cosine":
        return peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
    if training.lr_schedule == "linear":
        return peak * (1 - progress)
    raise ValueError(f"unknown lr_schedule {training.lr_schedule!r}")
