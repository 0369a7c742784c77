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

The parameter table (`parameter_table`, at the end of this file) holds every fact about each parameter: its
global name and shape, the dimension tensor parallelism splits, its role (matrix, vector, embedding, readout),
its initialisation and its optimizer multipliers. Initialisation, the optimizer's groups (trainers.optim) and
the checkpointer read it; nothing else classifies parameters.

Each layer initialises itself on creation (`init_parameters`, on the stage that owns it): it draws each
parameter at its *global* shape from a generator seeded by (seed, global parameter name) and keeps this rank's
slice, so the same seed gives the same model whatever the layout. Global names use global layer indices
("blocks.3.attn.qkv.weight"), never stage-local ones."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from contract.spec import ModelSpec
from trainers import mup as mup_rules
from trainers.mup import MupConfig

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
    mup: MupConfig | None = None  # None: the standard parametrization

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GPTConfig:
        return cls(layers=spec.layers, hidden_size=spec.hidden_size, heads=spec.heads,
                   seq_length=spec.seq_length, vocab_size=spec.vocab_size, norm=spec.norm, mlp=spec.mlp,
                   positions=spec.positions, mup=MupConfig.from_spec(spec))

    @property
    def attention_scale(self) -> float | None:
        """The attention scores' scale; None: scaled_dot_product_attention's own 1/sqrt(head_dim)."""
        return None if self.mup is None else mup_rules.attention_scale(self.mup, self.head_dim)

    @property
    def output_scale(self) -> float | None:
        """What the logits are multiplied by; None: nothing (the standard parametrization)."""
        return None if self.mup is None else mup_rules.output_scale(self.mup, self.hidden_size)

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
        init_parameters(self, config, seed, tp, tp_rank)

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
        self.scale = config.attention_scale
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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
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
        init_parameters(self, config, seed, tp, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class Head(nn.Module):
    """Last pipeline stage: hidden states -> this rank's slice of the vocabulary logits."""

    def __init__(self, config: GPTConfig, tp: int, tp_rank: int, seed: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.global_prefix = "head"
        self.output_scale = config.output_scale
        self.ln_f = norm_layer(config)
        self.out = ColumnParallelLinear(config.hidden_size, config.vocab_size, config=megatron_config(tp),
                                        init_method=_no_init, bias=False, gather_output=False)
        init_parameters(self, config, seed, tp, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.out(self.ln_f(x))
        if self.output_scale is not None:  # µP; each vocabulary shard scaled alike, so the loss's softmax is too
            logits = logits * self.output_scale
        return logits


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over tokens, computed on vocabulary shards without gathering the logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), targets).mean()


# -- the parameter table: every fact about each parameter, in one place ----------------------------------------

# Roles, as µP and the weight-decay rules distinguish them.
MATRIX = "matrix"  # hidden-to-hidden weights: fan-in and fan-out both grow with the width
VECTOR = "vector"  # biases and norm gains: one number per feature
EMBEDDING = "embedding"  # token and position tables: a row per input, width columns
READOUT = "readout"  # the output head: width in, vocabulary out
ROLES = (MATRIX, VECTOR, EMBEDDING, READOUT)


@dataclass(frozen=True)
class ParameterInfo:
    """One row of the parameter table. Every field is a function of the model's global shapes, never of a
    rank's shard, so every layout gets the same values; optimizer hyperparameters are multipliers of the
    spec's (training.learning_rate through the schedule, training.weight_decay, optim.EPS)."""

    name: str  # global name, with global layer indices: "blocks.3.attn.qkv.weight"
    shape: tuple[int, ...]  # global (unsharded) shape
    shard_dim: int | None  # the dimension tensor parallelism splits; None: replicated on every tp rank
    role: str  # one of ROLES
    init: str  # "normal" (mean 0, standard deviation init_std), "zeros" or "ones"
    init_std: float
    lr_mult: float
    weight_decay_mult: float
    eps_mult: float

    def local_shape(self, tp: int) -> tuple[int, ...]:
        """This parameter's shape on one tensor-parallel rank."""
        if self.shard_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.shard_dim] //= tp
        return tuple(shape)

    def local_slice(self, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
        """Tensor-parallel rank `tp_rank`'s slice of the global tensor `full`."""
        return full if self.shard_dim is None else full.chunk(tp, dim=self.shard_dim)[tp_rank]


def _parameter(name: str, shape: tuple[int, ...], shard_dim: int | None, role: str, init: str,
               init_std: float = 0.0) -> ParameterInfo:
    """A row of the table with the standard parametrization's rules: weight decay on every role but vectors
    (biases and norm gains), the spec's learning rate and eps for all."""
    return ParameterInfo(name, shape, shard_dim, role, init, init_std, lr_mult=1.0,
                         weight_decay_mult=0.0 if role == VECTOR else 1.0, eps_mult=1.0)


def _with_mup(row: ParameterInfo, config: GPTConfig) -> ParameterInfo:
    """The row under µP (trainers.mup): matrix-like weights (role MATRIX) get the width-scaled init std and
    optimizer multipliers; every other role is vector-like (one dimension grows with the width at most)."""
    mup = config.mup
    matrix_like = row.role == MATRIX
    lr_mult, weight_decay_mult, eps_mult = mup_rules.optimizer_multipliers(mup, config.hidden_size, matrix_like)
    init, init_std = row.init, row.init_std
    if init == "normal":
        init_std = mup_rules.init_std(mup, config.hidden_size, matrix_like, row.init_std)
    if row.role == READOUT and mup.zero_init_readout:
        init, init_std = "zeros", 0.0
    return dataclasses.replace(row, init=init, init_std=init_std, lr_mult=lr_mult,
                               weight_decay_mult=weight_decay_mult, eps_mult=eps_mult)


def _column_parallel(name: str, fan_out: int, fan_in: int, std: float) -> list[ParameterInfo]:
    """A ColumnParallelLinear with bias: output features (weight rows, bias entries) split over tp."""
    return [_parameter(f"{name}.weight", (fan_out, fan_in), 0, MATRIX, "normal", std),
            _parameter(f"{name}.bias", (fan_out,), 0, VECTOR, "zeros")]


def _row_parallel(name: str, fan_out: int, fan_in: int, std: float) -> list[ParameterInfo]:
    """A RowParallelLinear with bias: input features (weight columns) split over tp; the bias, added after the
    sum over tp, whole on every rank."""
    return [_parameter(f"{name}.weight", (fan_out, fan_in), 1, MATRIX, "normal", std),
            _parameter(f"{name}.bias", (fan_out,), None, VECTOR, "zeros")]


def _norm(name: str, config: GPTConfig) -> list[ParameterInfo]:
    gain = [_parameter(f"{name}.weight", (config.hidden_size,), None, VECTOR, "ones")]
    if config.norm == "rmsnorm":
        return gain
    return gain + [_parameter(f"{name}.bias", (config.hidden_size,), None, VECTOR, "zeros")]


@functools.cache
def parameter_table(config: GPTConfig) -> Mapping[str, ParameterInfo]:
    """Every parameter of the model by global name, in the order the model registers them (embedding, blocks
    0 to layers - 1, head). Initialisation, the optimizer's groups and the checkpointer read it; nothing else
    classifies parameters.

    Initialisation is GPT-2's: N(0, 0.02) for weights and embeddings, the projections back into the residual
    stream (attn.proj, mlp.proj) scaled by 1/sqrt(2 * layers); biases 0; norm gains 1. Under µP
    (`config.mup`) each row then gets trainers.mup's rules, from these global shapes."""
    hidden, ffn, vocab = config.hidden_size, config.ffn_size, config.vocab_size
    residual_std = INIT_STD / math.sqrt(2 * config.layers)
    rows = [_parameter("embedding.tokens.weight", (vocab, hidden), 0, EMBEDDING, "normal", INIT_STD)]
    if config.positions == "learned":
        rows.append(_parameter("embedding.positions.weight", (config.seq_length, hidden), None, EMBEDDING,
                               "normal", INIT_STD))
    for index in range(config.layers):
        block = f"blocks.{index}"
        rows += _norm(f"{block}.ln_attn", config)
        rows += _column_parallel(f"{block}.attn.qkv", 3 * hidden, hidden, INIT_STD)
        rows += _row_parallel(f"{block}.attn.proj", hidden, hidden, residual_std)
        rows += _norm(f"{block}.ln_mlp", config)
        for name in ("gate", "up") if config.mlp == "swiglu" else ("fc",):
            rows += _column_parallel(f"{block}.mlp.{name}", ffn, hidden, INIT_STD)
        rows += _row_parallel(f"{block}.mlp.proj", hidden, ffn, residual_std)
    rows += _norm("head.ln_f", config)
    rows.append(_parameter("head.out.weight", (vocab, hidden), 0, READOUT, "normal", INIT_STD))
    if config.mup is not None:
        rows = [_with_mup(row, config) for row in rows]
    return MappingProxyType({row.name: row for row in rows})  # read-only: one table shared by every reader


def global_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(global name, parameter) for every parameter this rank holds, in the module's own order."""
    return [(f"{layer.global_prefix}.{name}", param)
            for layer in module.modules() if hasattr(layer, "global_prefix")
            for name, param in layer.named_parameters()]


# -- initialisation from global tensors ----------------------------------------------------------------------

def _generator(seed: int, global_name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{global_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def initial_global_tensor(parameter: ParameterInfo, seed: int) -> torch.Tensor:
    """The parameter's initial value at its global shape, drawn from a generator seeded by (seed, its name)."""
    if parameter.init == "ones":
        return torch.ones(parameter.shape)
    if parameter.init == "zeros":
        return torch.zeros(parameter.shape)
    return torch.empty(parameter.shape).normal_(0.0, parameter.init_std,
                                                generator=_generator(seed, parameter.name))


@torch.no_grad()
def init_parameters(layer: nn.Module, config: GPTConfig, seed: int, tp: int, tp_rank: int) -> None:
    """Sets every parameter of one pipeline layer to its slice of the seeded global tensor; checks first that
    the layer holds exactly the parameters the table lists for it, at the shapes it gives."""
    table = parameter_table(config)
    prefix = f"{layer.global_prefix}."
    names = {prefix + name for name, _ in layer.named_parameters()}
    listed = {name for name in table if name.startswith(prefix)}
    if names != listed:
        raise ValueError(f"{layer.global_prefix}: parameters not in the parameter table: {sorted(names - listed)}; "
                         f"in the table but not in the layer: {sorted(listed - names)}")
    for name, param in layer.named_parameters():
        row = table[prefix + name]
        if tuple(param.shape) != row.local_shape(tp):
            raise ValueError(f"{row.name}: shape {tuple(param.shape)} at tp={tp}, the parameter table says "
                             f"{row.local_shape(tp)} (global {row.shape}, split on dim {row.shard_dim})")
        param.copy_(row.local_slice(initial_global_tensor(row, seed), tp, tp_rank))
