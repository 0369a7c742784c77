"""The optimizer: AdamW, with weight decay on matrices (weights and embeddings) only, never on biases or
LayerNorm gains. `build_optimizer` is the one place it is made."""

from __future__ import annotations

import torch
from torch import nn

from contract.spec import TrainingSpec

BETAS = (0.9, 0.95)
EPS = 1e-8


def build_optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The schedule sets each group's lr before every step (see trainers.schedule).
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=BETAS, eps=EPS)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
