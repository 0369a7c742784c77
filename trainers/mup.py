"""µP, the maximal-update parametrization: the rules, as pure functions of the model's global shapes.

Under µP, hyperparameters tuned on a narrow model (the base width) stay optimal as the width grows, because
every layer's update changes its outputs by Θ(1) per coordinate at any width. The parameter table
(trainers.model) calls these functions for each row, from global shapes, never from a rank's shard, so every
layout gets the same values. With Adam(W) and width multiplier m = hidden_size / base_hidden_size:

    matrix-like (hidden-to-hidden weights)   init std × 1/sqrt(m) (the fan-in ratio), lr × 1/m, eps × 1/m,
                                             weight decay × m^e (λ ∝ d^e, e = 1 by default: η·λ stays constant)
    vector-like (embeddings, the readout,    init unchanged, lr × 1, weight decay 0
      biases, norm gains)
    logits                                   × output_multiplier / m (on each vocabulary shard)
    attention scores                         × attention_multiplier · sqrt(base_head_dim) / head_dim

At the base width (m = 1, head_dim = base_head_dim, multipliers 1) this is the standard parametrization except
that embeddings and the readout are not decayed. The weight-decay rule is from "Robust Layerwise Scaling Rules
by Proper Weight Decay Tuning"; eps shrinks with the gradients of matrix-like weights (Θ(1/m) under µP) so it
keeps the same size relative to them.

`top_singular_value` is that paper's diagnostic: σ_max of a weight at its global shape, by power iteration on
tensor-parallel shards; `reported_matrices` says which matrices a metric point carries it for (trainers.main
reports them every `model.mup.sigma_every_steps` steps)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MupConfig:
    """The spec's `model.mup`, resolved: every field set."""

    base_hidden_size: int
    base_head_dim: int
    output_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    zero_init_readout: bool = False
    weight_decay_exponent: float = 1.0

    @classmethod
    def from_spec(cls, model) -> MupConfig | None:
        """From a contract.spec.ModelSpec; None when it has no `mup` section (the standard parametrization).
        The base head dim defaults to the base width's share per head at the spec's head count."""
        mup = model.mup
        if mup is None:
            return None
        base_head_dim = mup.base_head_dim or mup.base_hidden_size // model.heads
        return cls(base_hidden_size=mup.base_hidden_size, base_head_dim=base_head_dim,
                   output_multiplier=mup.output_multiplier, attention_multiplier=mup.attention_multiplier,
                   zero_init_readout=mup.zero_init_readout, weight_decay_exponent=mup.weight_decay_exponent)


def width_multiplier(mup: MupConfig, hidden_size: int) -> float:
    """m: how many times wider than the base this model is."""
    return hidden_size / mup.base_hidden_size


def init_std(mup: MupConfig, hidden_size: int, matrix_like: bool, standard_std: float) -> float:
    """A weight's initial standard deviation: the standard one (set at the base width) times
    sqrt(base fan-in / fan-in) for matrix-like weights, whose fan-ins (the width, or the MLP width, which is
    proportional to it) all grow by m; unchanged for embeddings and the readout."""
    if not matrix_like:
        return standard_std
    return standard_std / math.sqrt(width_multiplier(mup, hidden_size))


def optimizer_multipliers(mup: MupConfig, hidden_size: int, matrix_like: bool) -> tuple[float, float, float]:
    """(lr_mult, weight_decay_mult, eps_mult) of a parameter, multiplying the spec's learning rate and weight
    decay and the optimizer's eps."""
    if not matrix_like:
        return 1.0, 0.0, 1.0
    m = width_multiplier(mup, hidden_size)
    return 1.0 / m, m ** mup.weight_decay_exponent, 1.0 / m


def output_scale(mup: MupConfig, hidden_size: int) -> float:
    """What the logits are multiplied by: output_multiplier / m."""
    return mup.output_multiplier / width_multiplier(mup, hidden_size)


def attention_scale(mup: MupConfig, head_dim: int) -> float:
    """The attention scores' scale: 1/head_dim (µP: queries and keys become correlated as they train, so
    their dot product grows like head_dim), times sqrt(base_head_dim) so that it is the standard
    1/sqrt(head_dim) at the base head dim, times the attention multiplier."""
    return mup.attention_multiplier * math.sqrt(mup.base_head_dim) / head_dim


def record(mup: MupConfig | None) -> dict:
    """The parametrization as a checkpoint manifest records it: {"mup": None} for the standard one."""
    return {"mup": None if mup is None else asdict(mup)}


def parametrization_mismatch(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint written under `saved` (a manifest's record; None from before records existed: the
    standard parametrization) must not be resumed under `current`, naming the spec field; None if they agree."""
    saved_mup = (saved or {"mup": None})["mup"]
    current_mup = current["mup"]
    if saved_mup is None and current_mup is None:
        return None
    if saved_mup is None or current_mup is None:
        def describe(mup):
            return "the standard parametrization (no model.mup)" if mup is None else "µP (model.mup set)"
        return (f"model.mup: the checkpoint was written under {describe(saved_mup)}, this job uses "
                f"{describe(current_mup)}")
    for field in current_mup:
        if saved_mup.get(field) != current_mup[field]:
            return (f"model.mup.{field}: the checkpoint was written with {saved_mup.get(field)!r}, this job has "
                    f"{current_mup[field]!r}")
    return None


# -- the top-singular-value diagnostic --------------------------------------------------------------------------

@torch.no_grad()
def top_singular_value(local: torch.Tensor, shard_dim: int | None, group=None, iterations: int = 20,
                       seed: int = 0) -> float:
    """σ_max of a 2-D weight at its global shape, from this rank's shard: `shard_dim` is the dimension tensor
    parallelism splits (None: whole on every rank), `group` the tensor-parallel process group (None: no
    split, or the default group). Every rank of the group calls it and gets the same value.

    Power iteration on the Gram matrix WᵀW = Σ_r W_rᵀ W_r, where W_r are the row blocks of W (of Wᵀ for a
    weight split by columns): each rank multiplies by its block, an all-reduce sums, and the vector it iterates
    on is whole and identical on every rank (seeded alike)."""
    if local.dim() != 2:
        raise ValueError(f"top_singular_value needs a matrix, got shape {tuple(local.shape)}")
    block = local.detach().float()
    if shard_dim == 1:
        block = block.t()  # Wᵀ's rows are split: σ_max(Wᵀ) = σ_max(W)
    split = shard_dim is not None and dist.is_initialized() and dist.get_world_size(group) > 1

    def summed(x: torch.Tensor) -> torch.Tensor:
        if split:
            dist.all_reduce(x, group=group)
        return x

    # Drawn on the CPU from its own generator (the same on every rank, and torch's global RNG is left alone),
    # then moved beside the weight.
    vector = torch.randn(block.shape[1], generator=torch.Generator().manual_seed(seed)).to(block.device)
    vector /= vector.norm()
    for _ in range(iterations):
        vector = summed(block.t() @ (block @ vector))
        norm = vector.norm()
        if norm == 0:
            return 0.0
        vector /= norm
    squared = summed((block @ vector).square().sum().reshape(1))  # ||W v||² over all row blocks
    return math.sqrt(squared.item())


def top_singular_values(parameters, table, group=None, iterations: int = 20) -> dict[str, float]:
    """σ_max at the global shape of each matrix this rank holds: `parameters` are (global name, parameter)
    pairs (trainers.model.global_named_parameters), `table` the parameter table (for each one's shard
    dimension), `group` the tensor-parallel group. Collective over `group`: every rank of it holds the same
    names (the same pipeline stage) and calls this at the same step."""
    return {name: top_singular_value(param, table[name].shard_dim, group, iterations)
            for name, param in parameters if len(table[name].shape) == 2}


def reported_matrices(table, cap: int) -> list[str]:
    """The global names of the matrices whose σ_max is reported, in table order: every 2-D parameter when
    there are at most `cap`; otherwise those outside the blocks (embeddings, readout) and the matrices of as
    many whole blocks as fit, evenly spaced from the first block to the last. A function of the parameter
    table alone, so every rank picks the same names."""
    matrices = [name for name, row in table.items() if len(row.shape) == 2]
    if len(matrices) <= cap:
        return matrices

    def block_of(name: str) -> int | None:
        return int(name.split(".")[1]) if name.startswith("blocks.") else None

    outside = [name for name in matrices if block_of(name) is None]
    layers = 1 + max(block_of(name) for name in matrices if block_of(name) is not None)
    per_block = (len(matrices) - len(outside)) // layers
    fit = max(1, (cap - len(outside)) // per_block)
    kept = {0} if fit == 1 else {round(i * (layers - 1) / (fit - 1)) for i in range(fit)}
    return [name for name in matrices if block_of(name) is None or block_of(name) in kept]
