"""How much accelerator and host memory one rank of a job needs at a layout, with and without optimizer-state
offload: the arithmetic the control plane's planner and the offload planner (offload.plan) share. Pure functions;
the contract imports no offload, so this is the one place these bytes are written down.

Per rank under ZeRO-1, with n = parameters / (tp * pp) (the rank's model-parallel share) and n / dp its share of
the optimizer state:
  on the accelerator, always:  weights and gradients in the training precision, 2 * n * weight_bytes
  without offload, also:       fp32 master, exp_avg, exp_avg_sq and the fp32 gradient partition, 16 * n / dp
  pinned on the host, offload: the same 16 * n / dp plus the weights' copy for the refresh, weight_bytes * n / dp
  activations:                 an estimate (`approximate_activation_bytes`) or what a caller measured
A share of the accelerator (USABLE_FRACTION) is left for the CUDA context, allocator fragmentation and
communication buffers. A fit is an estimate, not a promise: it tells a layout that cannot work from one that may."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract.layout import Layout

if TYPE_CHECKING:
    from contract.spec import ModelSpec, TrainingSpec

USABLE_FRACTION = 0.9
# fp32 master weights, exp_avg, exp_avg_sq and the fp32 gradient partition, per parameter of the rank's share.
OFFLOAD_STATE_BYTES = 16
# The checkpointer's snapshot buffers of an offloaded state (fp32 master and two moments), kept from save to save.
SNAPSHOT_BYTES = 12
# Activations kept for the backward pass, per layer and micro-batch, in units of seq * batch * hidden values at
# two bytes: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), 10 of
# them kept whole and 24 split by tensor parallelism, without their 5*heads*seq/hidden term for the attention
# scores (scaled_dot_product_attention keeps no seq x seq matrix).
ACTIVATION_WHOLE = 10
ACTIVATION_SPLIT = 24
LOGIT_BYTES = 4  # the loss reads the logits in fp32
GiB = 1 << 30


def weight_bytes_of(precision: str) -> int:
    """Bytes of a weight (and of a gradient, an activation) in the training precision."""
    return 2 if precision == "bf16" else 4


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity ("16Gi", "500M", "1.5G", "250m") as a number."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", text)
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = float(match[1]), match[2] or ""
    if suffix == "m":
        return number / 1000
    if suffix.endswith("i"):
        return number * 1024 ** ("KMGTPE".index(suffix[0]) + 1)
    return number * 1000 ** ("kMGTPE".index(suffix) + 1) if suffix else number


def approximate_parameters(m: ModelSpec) -> int:
    """About how many parameters the model has (its matrices and embeddings; the exact count is the parameter
    table's, rank-side): enough to size memory."""
    ffn = 4 * m.hidden_size if m.mlp == "gelu" else -(-8 * m.hidden_size // (3 * m.heads)) * m.heads
    mlp_matrices = 2 if m.mlp == "gelu" else 3
    per_layer = 4 * m.hidden_size ** 2 + mlp_matrices * ffn * m.hidden_size
    positions = m.seq_length * m.hidden_size if m.positions == "learned" else 0
    return 2 * m.vocab_size * m.hidden_size + positions + m.layers * per_layer


def approximate_activation_bytes(m: ModelSpec, t: TrainingSpec, layout: Layout) -> int:
    """About the activation memory of the rank that keeps the most: the first pipeline stage holds its layers'
    activations for as many micro-batches as DeepSpeed's schedule keeps in flight there (min(pp, micro-batches
    per step)); the logits of one micro-batch (vocabulary split by tp) are added as if on the same stage."""
    values = m.seq_length * t.micro_batch_size * m.hidden_size
    per_layer = values * (ACTIVATION_WHOLE + ACTIVATION_SPLIT / layout.tp) * weight_bytes_of(t.precision) / 2
    micro_batches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    in_flight = max(1, min(layout.pp, micro_batches))
    layers = m.layers / layout.pp * in_flight
    logits = m.seq_length * t.micro_batch_size * m.vocab_size / layout.tp * (weight_bytes_of(t.precision)
                                                                             + LOGIT_BYTES)
    return int(layers * per_layer + logits)


@dataclass(frozen=True)
class RankMemory:
    """Accelerator bytes one rank needs, by what they hold."""
    weights_and_gradients: int
    optimizer_state: int   # on the accelerator without offload, in pinned host memory with it
    activations: int

    @property
    def without_offload(self) -> int:
        return self.weights_and_gradients + self.optimizer_state + self.activations

    @property
    def with_offload(self) -> int:
        """Before interleaved offload's ring of device slots, which is sized to what is left."""
        return self.weights_and_gradients + self.activations


def rank_memory(params: int, layout: Layout, weight_bytes: int, activation_bytes: int = 0) -> RankMemory:
    return RankMemory(weights_and_gradients=2 * model_share(params, layout) * weight_bytes,
                      optimizer_state=OFFLOAD_STATE_BYTES * state_share(params, layout),
                      activations=activation_bytes)


def model_share(params: int, layout: Layout) -> int:
    """Parameters a rank holds: its tensor- and pipeline-parallel share of the model, rounded up."""
    return _ceil_div(params, layout.tp * layout.pp)


def state_share(params: int, layout: Layout) -> int:
    """Parameters of the rank's ZeRO-1 partition of the optimizer state: its share of the model over dp."""
    return _ceil_div(model_share(params, layout), layout.dp)


def pinned_host_bytes(params: int, layout: Layout, weight_bytes: int, snapshot: bool = False) -> int:
    """Host memory a rank pins with offload on (plus, with `snapshot`, the checkpointer's buffers of it)."""
    per_parameter = OFFLOAD_STATE_BYTES + weight_bytes + (SNAPSHOT_BYTES if snapshot else 0)
    return per_parameter * state_share(params, layout)


def usable_bytes(accelerator_memory_bytes: int) -> int:
    return int(accelerator_memory_bytes * USABLE_FRACTION)


@dataclass(frozen=True)
class Fit:
    """Whether a rank's share of the model fits in its accelerator at a layout, with and without offload."""
    layout: Layout
    memory: RankMemory
    accelerator_memory_bytes: int

    @property
    def usable_bytes(self) -> int:
        return usable_bytes(self.accelerator_memory_bytes)

    @property
    def fits_without_offload(self) -> bool:
        return self.memory.without_offload <= self.usable_bytes

    @property
    def fits_with_offload(self) -> bool:
        return self.memory.with_offload <= self.usable_bytes

    def describe(self) -> str:
        m = self.memory
        return (f"at {self.layout} a rank needs about {_gib(m.without_offload)} of accelerator memory without "
                f"offload, {_gib(m.with_offload)} with the optimizer state offloaded (weights and gradients "
                f"{_gib(m.weights_and_gradients)}, optimizer state {_gib(m.optimizer_state)}, activations "
                f"about {_gib(m.activations)}); {_gib(self.usable_bytes)} usable "
                f"({USABLE_FRACTION:.0%} of {_gib(self.accelerator_memory_bytes)})")


def fit_at(model: ModelSpec, training: TrainingSpec, layout: Layout, accelerator_memory: str) -> Fit:
    """The fit of a spec's model at `layout` in `accelerator_memory` (a quantity, per rank), from the model's
    approximate parameter count and activations."""
    memory = rank_memory(approximate_parameters(model), layout, weight_bytes_of(training.precision),
                         approximate_activation_bytes(model, training, layout))
    return Fit(layout, memory, int(parse_quantity(accelerator_memory)))


def offload_mode_for(requested: str, fit: Fit) -> str | None:
    """The offload mode a rank runs at the fit's layout: the requested one, except that `none` becomes
    `interleaved` when the model fits only with its optimizer state offloaded. None: it fits neither way."""
    if not fit.fits_with_offload:
        return None
    if requested == "none" and not fit.fits_without_offload:
        return "interleaved"
    return requested


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB"

