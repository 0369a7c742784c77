"""The optimizer: AdamW, its parameter groups read from the parameter table (trainers.model). `build_optimizer`
is the one place it is made, `set_lr` the one place its learning rates are set.

`training.offload` chooses which AdamW (offload.build): torch's, with the state beside the weights (mode none,
the default), or offload's HybridAdam with the state in host memory under DeepSpeed's ZeRO-1 CPU offload,
updated on the CPU (cpu) or on the CPU and the accelerator together (interleaved). Every mode does AdamW's
arithmetic on each group's own lr, weight decay and eps; the DeepSpeed config fragment it needs comes with it.

A group holds the parameters that share a row's optimizer multipliers (learning rate, weight decay, eps), and
keeps its multipliers in its own dict ("lr_mult", ...): ZeRO-1 keeps each group's custom keys but drops empty
groups, and the groups a rank has differ by pipeline stage, so a group's position says nothing. DeepSpeed's
own `set_lr` writes one learning rate into every group; Roundhouse's must be the one used."""

from __future__ import annotations

from collections.abc import Mapping

import offload
from torch import nn

from contract.spec import TrainingSpec
from trainers.model import ParameterInfo

BETAS = (0.9, 0.95)
EPS = 1e-8


def param_groups(parameters: list[tuple[str, nn.Parameter]], table: Mapping[str, ParameterInfo],
                 training: TrainingSpec) -> list[dict]:
    """AdamW's groups for this rank's `parameters` (global name, parameter): one per distinct (lr_mult,
    weight_decay_mult, eps_mult) of the table, ordered as they first appear in the whole table (so every stage
    orders its groups alike), each holding its parameters in the module's order; groups this rank holds no
    parameter of are left out."""
    def multipliers(row: ParameterInfo) -> tuple[float, float, float]:
        return row.lr_mult, row.weight_decay_mult, row.eps_mult

    grouped: dict[tuple[float, float, float], list[nn.Parameter]] = {multipliers(row): [] for row in table.values()}
    for name, param in parameters:
        if name not in table:
            raise ValueError(f"parameter {name!r} has no row in the parameter table")
        if param.requires_grad:
            grouped[multipliers(table[name])].append(param)
    return [{"params": params, "lr_mult": lr_mult, "weight_decay": training.weight_decay * weight_decay_mult,
             "eps": EPS * eps_mult}
            for (lr_mult, weight_decay_mult, eps_mult), params in grouped.items() if params]


def build_optimizer(parameters: list[tuple[str, nn.Parameter]], table: Mapping[str, ParameterInfo],
                    training: TrainingSpec) -> offload.Built:
    """The optimizer for `training.offload.mode` (`.optimizer`), and the DeepSpeed config fragment it needs
    (`.ds_config`, for offload.merge_ds_config). The schedule sets each group's lr before every step (`set_lr`)."""
    settings = offload.OffloadSettings(**training.offload.model_dump())
    return offload.build(settings, param_groups(parameters, table, training), lr=training.learning_rate,
                         betas=BETAS, eps=EPS)


def set_lr(optimizer, lr: float) -> None:
    """Sets each group's learning rate to the schedule's `lr` times the group's multiplier."""
    for index, group in enumerate(optimizer.param_groups):
        if "lr_mult" not in group:
            raise ValueError(f"optimizer param group {index} has no 'lr_mult': groups must come from param_groups")
        group["lr"] = lr * group["lr_mult"]
