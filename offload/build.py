"""The entry point the trainer calls: the optimizer for an offload mode and the DeepSpeed config it needs.

    built = offload.build(settings, param_groups, lr=..., betas=..., eps=...)
    ds_config = offload.merge_ds_config(ds_config, built.ds_config)
    engine = deepspeed.initialize(model=..., optimizer=built.optimizer, config=ds_config)

Modes: "none" (torch's AdamW; the state on the accelerator), "cpu" (DeepSpeed's ZeRO-1 CPU offload with
HybridAdam updating every subgroup on the CPU: torch's fused AdamW), "interleaved" (the same offload, with the
device updating the subgroups the placement gives it)."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

import torch

from offload.device import CudaDevice, Device, SimulatedDevice, cuda_available
from offload.hybrid_adam import HybridAdam
from offload.perf_model import MAX_SLOTS, MachineProfile, choose_placement, load_profile, slots_that_fit
from offload.subgroups import DEFAULT_SUBGROUP_SIZE, Placement, Subgroup

MODES = ("none", "cpu", "interleaved")
PLACEMENTS = ("auto", "static")
# Of the device memory free when the first update is planned, the share the ring may take (the rest absorbs
# the allocator's fragmentation and the next step's activations).
RING_SHARE_OF_FREE = 0.5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadSettings:
    """`training.offload` of the job spec, as the ranks see it."""
    mode: str = "none"
    subgroup_size: int = DEFAULT_SUBGROUP_SIZE
    placement: str = "auto"                 # auto: the performance model; static: device_fraction
    device_fraction: float | None = None    # static: the share of each group's subgroups on the device
    cpu_threads: int | None = None          # the CPU update's threads (torch's intra-op pool); None: the affinity
    profile: str | None = None              # auto: plan from this profile instead of calibrating at start-up

    def __post_init__(self):
        where = "training.offload"
        if self.mode not in MODES:
            raise ValueError(f"{where}.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.subgroup_size, int) or self.subgroup_size < 1:
            raise ValueError(f"{where}.subgroup_size must be a positive integer, got {self.subgroup_size!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{where}.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.placement == "static":
            if self.device_fraction is None or not 0.0 <= self.device_fraction <= 1.0:
                raise ValueError(f"{where}.device_fraction must be in [0, 1] for placement static, "
                                 f"got {self.device_fraction!r}")
        elif self.device_fraction is not None:
            raise ValueError(f"{where}.device_fraction is only for placement static")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"{where}.cpu_threads must be a positive integer, got {self.cpu_threads!r}")
        if self.profile is not None and self.placement != "auto":
            raise ValueError(f"{where}.profile is only for placement auto")


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    ds_config: dict            # merge into the DeepSpeed config with merge_ds_config
    device: Device | None      # the device HybridAdam updates on (interleaved), else None


def ds_config_for(mode: str) -> dict:
    """DeepSpeed settings for a mode: ZeRO-1 offload of the optimizer state to pinned host memory, with our
    optimizer accepted as the client optimizer (DeepSpeed checks the exact type otherwise)."""
    if mode == "none":
        return {}
    return {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}},
            "zero_force_ds_cpu_optimizer": False,
            "zero_allow_untested_optimizer": True}


def merge_ds_config(config: dict, fragment: dict) -> dict:
    """A copy of `config` with `fragment` merged in (nested dicts merged key by key)."""
    merged = copy.deepcopy(config)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_ds_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_device() -> Device:
    """The CUDA device; on a machine without one, a simulated device (exercises the same code, at CPU speed)."""
    if cuda_available():
        return CudaDevice()
    log.info("offload: no CUDA device; interleaved mode runs on a simulated device")
    return SimulatedDevice(memory_bytes=4 << 30)


def auto_planner(device: Device, profile: MachineProfile):
    """Plans with the performance model when the first update runs, with the device memory free then."""
    def plan(table: list[Subgroup]) -> Placement:
        free = int(device.free_memory() * RING_SHARE_OF_FREE)
        decision = choose_placement(table, profile, free_bytes=free)
        log.info("offload: %d of %d subgroups on the device (%.0f%% of elements), K=%d; predicted update %.1f ms "
                 "(DeepSpeed CPU offload %.1f ms)", len(decision.placement.on_device), len(table),
                 100 * decision.device_fraction, decision.placement.slots, decision.interleaved_s * 1e3,
                 decision.cpu_offload_s * 1e3)
        return decision.placement
    return plan


def static_planner(device: Device, fraction: float):
    def plan(table: list[Subgroup]) -> Placement:
        slots = slots_that_fit(table, int(device.free_memory() * RING_SHARE_OF_FREE), MAX_SLOTS)
        if fraction > 0 and slots == 0:
            raise RuntimeError("training.offload: no device slot fits in the free device memory; lower "
                               "training.offload.subgroup_size")
        return Placement.fraction(table, fraction, slots)
    return plan


def cpu_threads(settings: OffloadSettings) -> int:
    """The CPU update's threads: as set, else one per core this process may run on (its affinity, which a
    launcher or container narrows to the rank's share)."""
    if settings.cpu_threads is not None:
        return settings.cpu_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build(settings: OffloadSettings, param_groups, *, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float = 0.0, device: Device | None = None) -> Built:
    """The optimizer and DeepSpeed config fragment for `settings.mode`. Each param group keeps its own lr,
    weight_decay, eps and any custom keys; the keyword values are the defaults for groups that lack them."""
    if settings.mode == "none":
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return Built(optimizer, {}, None)
    if settings.mode == "cpu":
        optimizer = HybridAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                               subgroup_size=settings.subgroup_size, cpu_threads=cpu_threads(settings))
        return Built(optimizer, ds_config_for("cpu"), None)
    device = device or default_device()
    if settings.placement == "static":
        planner = static_planner(device, settings.device_fraction)
    else:
        from offload.calibrate import measure
        try:
            profile = load_profile(settings.profile) if settings.profile else measure(device, numel=1 << 22)
        except ValueError as e:
            raise ValueError(f"training.offload.profile: {e}") from None
        planner = auto_planner(device, profile)
    optimizer = HybridAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, device=device,
                           subgroup_size=settings.subgroup_size, planner=planner,
                           cpu_threads=cpu_threads(settings))
    return Built(optimizer, ds_config_for("interleaved"), device)
