"""The optimizer's state as the checkpointer sees it: for each of this rank's parameters, by global name, its
fp32 master weight and Adam's two moments, and Adam's step count. `OptimizerState` is the interface;
`ZeroOneOptimizerState` implements it for DeepSpeed's ZeRO stage 1 and is the only code that reads
DeepSpeed's optimizer internals.

Shapes are tensor-parallel-local (each tensor-parallel rank has its own slice of a parameter; the
checkpointer places it at its global shape with the parameter table). Under ZeRO, data-parallel ranks
partition the state: a rank holds a contiguous stretch of each flattened parameter, or none of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from trainers.model import global_named_parameters

MASTER = "master"  # the fp32 master weight
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's first and second moments, named as torch's AdamW names them
KINDS = (MASTER, *MOMENTS)


@dataclass(frozen=True)
class Fragment:
    """This rank's partition of one parameter's master weight or moment: elements [start, start +
    source.numel()) of the flattened (tensor-parallel-local) parameter, as a view of the live state."""

    name: str  # the parameter's global name
    kind: str  # one of KINDS
    shape: torch.Size  # the whole (tensor-parallel-local) parameter's shape
    start: int
    source: torch.Tensor | None  # None: the parameter lies wholly in other data-parallel ranks' partitions


class OptimizerState(Protocol):
    def parameter_shapes(self) -> dict[str, torch.Size]:
        """This rank's parameters by global name, at their tensor-parallel-local shapes, sorted by name."""

    def data_parallel_ranks(self) -> list[int]:
        """The ranks over which this rank's state is partitioned (a whole tensor is the sum of their
        fragments, zeros elsewhere)."""

    def fragments(self) -> list[Fragment]:
        """Every (parameter, kind) of this rank, sorted by name then kind, as views of the live state: they
        change in the optimizer's step, and are only valid until the next one."""

    def step(self) -> torch.Tensor:
        """Adam's step count (a float32 scalar, on the CPU): it sets the bias corrections."""

    def load(self, tensors: dict[tuple[str, str], torch.Tensor], step: torch.Tensor) -> None:
        """Sets the whole state: every (kind, global name) of `parameter_shapes` at its tensor-parallel-local
        shape, the module's weights (what forward uses) from the master weights, and Adam's step count."""


class ZeroOneOptimizerState:
    """OptimizerState of a DeepSpeed engine with ZeRO stage 1 wrapping torch's AdamW.

    DeepSpeed maps each parameter to its slice of the flat partition (`_hp_mapping`, which its own
    `safe_get_full_*` read), keeps the partitions in `single_partition_of_fp32_groups`, and links the moments
    only after AdamW's first step has created them (`_lazy_init_hp_params_optimizer_state`)."""

    def __init__(self, engine):
        self.engine = engine
        self.zero = engine.optimizer  # DeepSpeed's ZeRO stage 1 optimizer; .optimizer is torch's AdamW
        if not hasattr(self.zero, "single_partition_of_fp32_groups"):
            raise TypeError(f"the engine's optimizer is {type(self.zero).__name__}, not DeepSpeed's ZeRO stage 1 "
                            "optimizer (zero_optimization.stage must be 1)")
        # Every rank of a stage walks the parameters in the same order: its collectives pair up.
        self.parameters = sorted(global_named_parameters(engine.module), key=lambda item: item[0])

    def parameter_shapes(self) -> dict[str, torch.Size]:
        return {name: param.shape for name, param in self.parameters}

    def data_parallel_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.zero.dp_process_group)

    def fragments(self) -> list[Fragment]:
        self._link_moments()
        fragments = []
        for name, param in self.parameters:
            mapping = param._hp_mapping
            for kind in KINDS:
                if mapping is None:
                    fragments.append(Fragment(name, kind, param.shape, 0, None))
                else:
                    fragments.append(Fragment(name, kind, param.shape, mapping.lp_fragment_address.start,
                                              mapping.get_hp_fragment(None if kind == MASTER else kind)))
        return fragments

    def step(self) -> torch.Tensor:
        for flat in self.zero.single_partition_of_fp32_groups:  # the same count in every partition
            state = self.zero.optimizer.state.get(flat)
            if state and "step" in state:
                return state["step"].detach().to("cpu", torch.float32).reshape(()).clone()
        return torch.zeros((), dtype=torch.float32)

    def load(self, tensors: dict[tuple[str, str], torch.Tensor], step: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._create_state(step)
        with torch.no_grad():
            for name, param in self.parameters:
                master = tensors[(MASTER, name)]
                param.copy_(master)  # the module's copy (what forward uses) ...
                safe_set_full_fp32_param(param, master)  # ... and ZeRO's fp32 master
                for moment in MOMENTS:
                    safe_set_full_optimizer_state(param, tensors[(moment, name)], moment)
        # The engine's own counters follow (DeepSpeed only logs them): one Adam step per training step.
        self.engine.global_steps = int(step.item())
        self.engine.global_samples = self.engine.global_steps * self.engine.train_batch_size()

    def _create_state(self, step: torch.Tensor) -> None:
        """AdamW creates its state on the first step, and DeepSpeed links each parameter to its slice of that
        state only then; a resumed run needs the state before that step, so it is created here, as AdamW
        would, and linked the same way."""
        create = getattr(self.zero.optimizer, "state_of", None)  # offload's HybridAdam: its own (pinned) state
        for flat in self.zero.single_partition_of_fp32_groups:
            state = create(flat) if create is not None else self.zero.optimizer.state[flat]
            state["step"] = step.detach().clone()
            for moment in MOMENTS:
                state.setdefault(moment, torch.zeros_like(flat, memory_format=torch.preserve_format))
        self._link_moments()

    def _link_moments(self) -> None:
        """Points each parameter at its slice of the moments, for `get_hp_fragment` and `safe_*_optimizer_state`.

        DeepSpeed links them once, right after the first parameter group's first step, when the other groups
        have no state yet; so the link is made again here, once every group's state exists."""
        if all(self.zero.optimizer.state.get(flat) for flat in self.zero.single_partition_of_fp32_groups):
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()
