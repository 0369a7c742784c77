"""A plain single-process PyTorch GPT, the same architecture and size as the trainer's model but with dense
layers and no megatron-core or DeepSpeed: the baseline that the trainer's overhead is measured against
(benchmarks/trainer_overhead.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from contract.spec import ModelSpec, TrainingSpec
from trainers.model import GPTConfig
from trainers.optim import BETAS, EPS

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, hidden = x.shape
        # (B, T, 3H) -> three (B, heads, T, head_dim) tensors
        q, k, v = self.qkv(x).view(batch, time, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, hidden))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.proj = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_emb = nn.Embedding(config.seq_length, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for `tokens` (B, T); with `targets`, the mean cross-entropy instead."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style: N(0, 0.02) everywhere, residual-stream output projections scaled down by
        sqrt(2 * layers) so the residual variance does not grow with depth; biases 0, LayerNorms identity."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(".proj") else INIT_STD
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(spec: ModelSpec, seed: int) -> GPT:
    """The model with its initial weights, identical on every rank for the same seed."""
    model = GPT(GPTConfig.from_spec(spec))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def build_optimizer(model: GPT, training: TrainingSpec) -> torch.optim.Optimizer:
    """The trainer's optimizer for this model: AdamW with the trainer's betas and eps, weight decay on the
    weights and embeddings (as the trainer's parameter table has it), not on biases and LayerNorms. Groups
    carry lr_mult, so trainers.optim.set_lr sets their learning rate."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=BETAS, eps=EPS)
