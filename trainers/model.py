"""The GPT, tensor-parallel: the whole model in one file.

Token embeddings (+ learned positions, or rotary positions applied to queries and keys), pre-norm
transformer blocks (causal self-attention on this rank's heads, a GELU or SwiGLU MLP), LayerNorm or RMSNorm,
a final norm and an untied output head, with megatron-core's tensor-parallel layers:

    token embedding    VocabParallelEmbedding   vocabulary rows split over tp
    qkv, mlp.fc/gate/up ColumnParallelLinear    output features split (whole heads for qkv)
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

from contract.spec import ModelSpec

INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    hidden_size: int
    heads: int
    seq_length: int
    vocab_size: int
    norm: str = "layernorm"
    mlp: str = "gelu"
    positions: str = "learned"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GPTConfig:
        return cls(layers=spec.layers, hidden_size=spec.hidden_size, heads=spec.heads,
                   seq_length=spec.seq_length, vocab_size=spec.vocab_size, norm=spec.norm, mlp=spec.mlp,
                   positions=spec.positions)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def ffn_size(self) -> int:
        """4H for GELU; for SwiGLU (three matrices) about 8H/3, rounded up to a multiple of the head count so
        that every tensor-parallel size the heads allow also divides it."""
        if self.mlp == "gelu":
            return 4 * self.hidden_size
        return -(-8 * self.hidden_size // (3 * self.heads)) * self.heads


def norm_layer(config: GPTConfig) -> nn.Module:
    return nn.RMSNorm(config.hidden_size) if config.norm == "rmsnorm" else nn.LayerNorm(config.hidden_size)


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
        # Rotary positions live in attention instead.
        self.positions = nn.Embedding(config.seq_length, config.hidden_size) if config.positions == "learned" \
            else None
        init_parameters(self, config.layers, seed, tp, tp_rank)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tokens(tokens)
        if self.positions is not None:
            x = x + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        return x


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: each pair of channels (i, i + d/2) turned by a position-dependent angle."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def rotary_tables(seq_length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, tp: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mp = megatron_config(tp)
        self.local_heads = config.heads // tp
        self.head_dim = config.head_dim
        if config.positions == "rotary":
            cos, sin = rotary_tables(config.seq_length, config.head_dim)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        else:
            self.rotary_cos = self.rotary_sin = None
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
        if self.rotary_cos is not None:
            cos, sin = self.rotary_cos[:time], self.rotary_sin[:time]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out, _ = self.proj(y.transpose(1, 2).reshape(batch, time, self.local_heads * self.head_dim))
        return out


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))). SwiGLU: proj(silu(gate(x)) * up(x)); gate and up are separate column-parallel
    layers so that each rank's slices of them belong together whatever the tensor-parallel size."""

    def __init__(self, config: GPTConfig, tp: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mp = megatron_config(tp)

        def column() -> ColumnParallelLinear:
            return ColumnParallelLinear(config.hidden_size, config.ffn_size, config=mp, init_method=_no_init,
                                        bias=True, gather_output=False)

        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate, self.up = column(), column()
        else:
            self.fc = column()
        self.proj = RowParallelLinear(config.ffn_size, config.hidden_size, config=mp, init_method=_no_init,
                                      bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            hidden = F.silu(self.gate(x)[0]) * self.up(x)[0]
        else:
            hidden = F.gelu(self.fc(x)[0])
        out, _ = self.proj(hidden)
        return out


class Block(nn.Module):
    """One pre-norm transformer block: hidden states in, hidden states out."""

    def __init__(self, config: GPTConfig, tp: int, tp_rank: int, seed: int, layer_index: int):
        super().__init__()
        self.global_prefix = f"blocks.{layer_index}"
        self.ln_attn = norm_layer(config)
        self.attn = Attention(config, tp)
        self.ln_mlp = norm_layer(config)
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
        self.ln_f = norm_layer(config)
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
    "mlp.gate.weight": 0, "mlp.gate.bias": 0,
    "mlp.up.weight": 0, "mlp.up.bias": 0,
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
    scaled by 1/sqrt(2 * layers); biases 0; norm gains 1."""
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
