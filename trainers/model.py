"""The GPT, tensor-parallel: the whole model in one file.

Token + learned position embeddings, pre-norm transformer blocks (causal self-attention on this rank's
heads, a GELU MLP), a final LayerNorm and an untied output head, with megatron-core's tensor-parallel layers:

    token embedding    VocabParallelEmbedding   vocabulary rows split over tp
    qkv, mlp.fc        ColumnParallelLinear     output features split (whole heads for qkv)
    attn.proj, mlp.proj RowParallelLinear       input features split, outputs summed over tp
    head               ColumnParallelLinear     vocabulary split; the loss is vocab_parallel_cross_entropy

The model comes in three kinds of pipeline layer (`Embedding`, `Block`, `Head`) so that DeepSpeed's
PipelineModule can place them on stages. No dropout: a step is a pure function of weights and batch.

Each layer initialises itself on creation (`init_parameters`, on the stage that owns it): it draws each parameter at its *global* shape from a generator seeded by
(seed, global parameter name) and keeps this rank's slice, so the same seed gives the same model whatever
the layout. Global names use global layer indices ("blocks.3.attn.qkv.weight"), never stage-local ones."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.spec import ModelSpec

INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    hidden_size: int
    heads: int
    seq_length: int
    vocab_size: int

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GPTConfig:
        return cls(layers=spec.layers, hidden_size=spec.hidden_size, heads=spec.heads,
                   seq_length=spec.seq_length, vocab_size=spec.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


def megatron_config(tp: int):
    """What megatron-core's layers need to know: CPU-side creation, fp32. Megatron's own initialisation runs
    (it marks each split parameter with its partition dimension) but draws nothing: `init_parameters` sets
    the values afterwards."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=torch.float32,
                               gradient_accumulation_fusion=False)


def _no_init(weight: torch.Tensor) -> None:
    """The init method megatron calls on the global tensor: nothing; `init_parameters` sets the values."""


class Embedding(nn.Module):
    """First pipeline stage: tokens (B, T) -> hidden states (B, T, H)."""

    def __init__(self, config: GPTConfig, tp: int, tp_rank: int, seed: int):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.global_prefix = "embedding"
        self.tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, init_method=_no_init,
                                             config=megatron_config(tp))
        self.positions = nn.Embedding(config.seq_length, config.hidden_size)
        init_parameters(self, config.layers, seed, tp, tp_rank)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.tokens(tokens) + self.positions(positions)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, tp: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mp = megatron_config(tp)
        self.local_heads = config.heads // tp
        self.head_dim = config.head_dim
        # Output rows are ordered (head, q|k|v, head_dim), so each rank's contiguous slice holds whole heads.
        self.qkv = ColumnParallelLinear(config.hidden_size, 3 * config.hidden_size, config=mp,
                                        init_method=_no_init, bias=True, gather_output=False)
        self.proj = RowParallelLinear(config.hidden_size, config.hidden_size, config=mp, init_method=_no_init,
                                      bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        qkv, _ = self.qkv(x)
        # (B, T, local_heads * 3 * head_dim) -> three (B, local_heads, T, head_dim)
        q, k, v = qkv.view(batch, time, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out, _ = self.proj(y.transpose(1, 2).reshape(batch, time, self.local_heads * self.head_dim))
        return out


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, tp: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mp = megatron_config(tp)
        self.fc = ColumnParallelLinear(config.hidden_size, 4 * config.hidden_size, config=mp,
                                       init_method=_no_init, bias=True, gather_output=False)
        self.proj = RowParallelLinear(4 * config.hidden_size, config.hidden_size, config=mp, init_method=_no_init,
                                      bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.fc(x)
        out, _ = self.proj(F.gelu(hidden))
        return out


class Block(nn.Module):
    """One pre-norm transformer block: hidden states in, hidden states out."""

    def __init__(self, config: GPTConfig, tp: int, tp_rank: int, seed: int, layer_index: int):
        super().__init__()
        self.global_prefix = f"blocks.{layer_index}"
        self.ln_attn = nn.LayerNorm(config.hidden_size)
        self.attn = Attention(config, tp)
        self.ln_mlp = nn.LayerNorm(config.hidden_size)
        self.mlp = MLP(config, tp)
        init_parameters(self, config.layers, seed, tp, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class Head(nn.Module):
    """Last pipeline stage: hidden states -> this rank's slice of the vocabulary logits."""

    def __init__(self, config: GPTConfig, tp: int, tp_rank: int, seed: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.global_prefix = "head"
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.out = ColumnParallelLinear(config.hidden_size, config.vocab_size, config=megatron_config(tp),
                                        init_method=_no_init, bias=False, gather_output=False)
        init_parameters(self, config.layers, seed, tp, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.out(self.ln_f(x))
        return logits


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over tokens, computed on vocabulary shards without gathering the logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), targets).mean()


# -- initialisation from global tensors ----------------------------------------------------------------------

# How each parameter is split over tensor parallelism: the dimension of its global tensor that is sliced
# (None: replicated on every tp rank). Keyed by the parameter's name within its pipeline layer.
SHARD_DIM = {
    "tokens.weight": 0,
    "attn.qkv.weight": 0, "attn.qkv.bias": 0,
    "mlp.fc.weight": 0, "mlp.fc.bias": 0,
    "attn.proj.weight": 1,
    "mlp.proj.weight": 1,
    "out.weight": 0,
}


def global_shape(local: torch.Tensor, name: str, tp: int) -> tuple[int, ...]:
    shape = list(local.shape)
    dim = SHARD_DIM.get(name)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


def _generator(seed: int, global_name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{global_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def initial_global_tensor(global_name: str, shape: tuple[int, ...], layers: int, seed: int) -> torch.Tensor:
    """GPT-2 style: N(0, 0.02) for weights and embeddings, with the residual-stream output projections
    scaled by 1/sqrt(2 * layers); biases 0; LayerNorm gains 1."""
    if global_name.endswith(("ln_attn.weight", "ln_mlp.weight", "ln_f.weight")):
        return torch.ones(shape)
    if global_name.endswith(".bias"):
        return torch.zeros(shape)
    std = INIT_STD / math.sqrt(2 * layers) if global_name.endswith("proj.weight") else INIT_STD
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, global_name))


@torch.no_grad()
def init_parameters(layer: nn.Module, layers: int, seed: int, tp: int, tp_rank: int) -> None:
    """Sets every parameter of one pipeline layer to its slice of the seeded global tensor."""
    for name, param in layer.named_parameters():
        global_name = f"{layer.global_prefix}.{name}"
        full = initial_global_tensor(global_name, global_shape(param, name, tp), layers, seed)
        dim = SHARD_DIM.get(name)
        param.copy_(full if dim is None else full.chunk(tp, dim=dim)[tp_rank])
