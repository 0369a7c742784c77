"""The performance model of the update phase (pure functions): from a machine's measured or estimated rates, the
ring size K, which subgroups the device updates, and the predicted update time with no offload, with DeepSpeed's
CPU offload and interleaved.

What moves per element of a device subgroup: in, fp32 param, grad, exp_avg, exp_avg_sq (16 bytes); out, fp32
param, exp_avg, exp_avg_sq (12 bytes). The device side is a three-stage pipeline (copy in, update, copy out)
through K slots; the CPU updates its subgroups meanwhile, slower than alone because the copies share host memory
bandwidth. Both modes that offload end with DeepSpeed's refresh of the bf16 weights (cast on the host, copied
to the device), which is the same for both and is added to both."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

from offload.subgroups import Placement, Subgroup, by_group, spread

BYTES_IN = 16   # fp32 param, grad, exp_avg, exp_avg_sq
BYTES_OUT = 12  # fp32 param, exp_avg, exp_avg_sq
SLOT_TENSORS = 4
MAX_SLOTS = 4   # three stages keep three slots busy; one more absorbs jitter


@dataclass(frozen=True)
class MachineProfile:
    """Rates of one rank's share of a machine. Bandwidths in bytes/s, Adam throughputs in parameters/s."""
    name: str
    estimate: bool                          # True: from public specifications, not measured
    source: str
    h2d_bytes_per_s: float                  # pinned host -> device, alone
    d2h_bytes_per_s: float                  # device -> pinned host, alone
    h2d_concurrent_bytes_per_s: float       # each direction while the other runs
    d2h_concurrent_bytes_per_s: float
    cpu_adam_params_per_s: float            # fused CPU AdamW on the rank's cores, alone
    cpu_adam_during_copies_params_per_s: float
    device_adam_params_per_s: float
    device_memory_bytes: int                # total device memory
    device_free_bytes: int                  # free at update time (measured), or the total for a profile

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and not value > 0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be positive, got {value!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def load_profile(name_or_path: str) -> MachineProfile:
    """A profile shipped in offload/profiles/ by name (e.g. "h100-pcie5"), or a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        files = resources.files("offload") / "profiles"
        candidate = files / f"{name_or_path}.json"
        if not candidate.is_file():
            known = sorted(p.name.removesuffix(".json") for p in files.iterdir() if p.name.endswith(".json"))
            raise ValueError(f"unknown profile {name_or_path!r}; known: {', '.join(known)}")
        text = candidate.read_text()
    data = json.loads(text)
    data.pop("comment", None)
    names = {f.name for f in fields(MachineProfile)}
    unknown = set(data) - names
    missing = names - set(data)
    if unknown or missing:
        raise ValueError(f"profile {name_or_path!r}: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
    return MachineProfile(**data)


def known_profiles() -> list[str]:
    files = resources.files("offload") / "profiles"
    return sorted(p.name.removesuffix(".json") for p in files.iterdir() if p.name.endswith(".json"))


# times ------------------------------------------------------------------------------------------------------
def device_pipeline_seconds(numels: list[int], slots: int, profile: MachineProfile) -> float:
    """Time for the device to take these subgroups (in order) through a ring of `slots` slots: a slot is
    refilled only when its previous subgroup has been copied out, each stream runs one thing at a time."""
    if not numels:
        return 0.0
    if slots < 1:
        raise ValueError("device subgroups need at least one slot")
    both_directions = slots > 1 and len(numels) > 1
    h2d = profile.h2d_concurrent_bytes_per_s if both_directions else profile.h2d_bytes_per_s
    d2h = profile.d2h_concurrent_bytes_per_s if both_directions else profile.d2h_bytes_per_s
    h2d_end = compute_end = 0.0
    d2h_ends: list[float] = []
    for j, n in enumerate(numels):
        slot_free = d2h_ends[j - slots] if j >= slots else 0.0
        h2d_end = max(h2d_end, slot_free) + n * BYTES_IN / h2d
        compute_end = max(compute_end, h2d_end) + n / profile.device_adam_params_per_s
        d2h_ends.append(max(d2h_ends[-1] if d2h_ends else 0.0, compute_end) + n * BYTES_OUT / d2h)
    return d2h_ends[-1]


def cpu_seconds(numel: int, copies_running: bool, profile: MachineProfile) -> float:
    rate = profile.cpu_adam_during_copies_params_per_s if copies_running else profile.cpu_adam_params_per_s
    return numel / rate


def bf16_refresh_seconds(numel: int, weight_bytes: int, profile: MachineProfile) -> float:
    """DeepSpeed's copy of the updated weights (in the training precision) to the device after an offloaded
    update."""
    return numel * weight_bytes / profile.h2d_bytes_per_s


def interleaved_seconds(table: list[Subgroup], placement: Placement, profile: MachineProfile,
                        weight_bytes: int = 2) -> float:
    """Predicted update time: the groups one after the other (DeepSpeed steps them in turn), in each the slower
    of the device pipeline and the CPU; then the bf16 refresh."""
    total = 0.0
    for members in by_group(table).values():
        device = [s.numel for s in members if s.index in placement.on_device]
        cpu = sum(s.numel for s in members if s.index not in placement.on_device)
        total += max(device_pipeline_seconds(device, placement.slots, profile),
                     cpu_seconds(cpu, bool(device), profile))
    return total + bf16_refresh_seconds(sum(s.numel for s in table), weight_bytes, profile)


def cpu_offload_seconds(numel: int, profile: MachineProfile, weight_bytes: int = 2) -> float:
    """DeepSpeed's CPU offload: the whole update on the CPU, then the bf16 refresh."""
    return cpu_seconds(numel, False, profile) + bf16_refresh_seconds(numel, weight_bytes, profile)


def no_offload_seconds(numel: int, profile: MachineProfile) -> float:
    """The state lives on the device: one fused update there, nothing copied."""
    return numel / profile.device_adam_params_per_s


# the decision -----------------------------------------------------------------------------------------------
def slots_that_fit(table: list[Subgroup], free_bytes: int, max_slots: int = MAX_SLOTS) -> int:
    """K: as many slots as useful and as fit in `free_bytes` (each holds four fp32 tensors of the largest
    subgroup)."""
    if not table:
        return 0
    slot_bytes = SLOT_TENSORS * 4 * max(s.numel for s in table)
    return max(0, min(max_slots, free_bytes // slot_bytes))


def ring_bytes(table: list[Subgroup], slots: int) -> int:
    return slots * SLOT_TENSORS * 4 * max((s.numel for s in table), default=0)


@dataclass(frozen=True)
class Decision:
    placement: Placement
    device_fraction: float           # of the elements
    no_offload_s: float
    cpu_offload_s: float
    interleaved_s: float
    ring_bytes: int


def choose_placement(table: list[Subgroup], profile: MachineProfile, free_bytes: int | None = None,
                     weight_bytes: int = 2, max_slots: int = MAX_SLOTS) -> Decision:
    """The placement with the least predicted update time: for each group, every count of device subgroups
    (spread evenly) is tried; ties go to fewer device subgroups. Deterministic in its inputs."""
    free = profile.device_free_bytes if free_bytes is None else free_bytes
    slots = slots_that_fit(table, free, max_slots)
    chosen: set[int] = set()
    if slots:
        for members in by_group(table).values():
            chosen |= _best_in_group(members, slots, profile)
    placement = Placement(frozenset(chosen), slots if chosen else 0)
    total = sum(s.numel for s in table)
    on_device = sum(s.numel for s in table if s.index in placement.on_device)
    return Decision(placement=placement, device_fraction=on_device / total if total else 0.0,
                    no_offload_s=no_offload_seconds(total, profile),
                    cpu_offload_s=cpu_offload_seconds(total, profile, weight_bytes),
                    interleaved_s=interleaved_seconds(table, placement, profile, weight_bytes),
                    ring_bytes=ring_bytes(table, placement.slots))


def _best_in_group(members: list[Subgroup], slots: int, profile: MachineProfile) -> set[int]:
    """The device's time grows and the CPU's shrinks with the number of device subgroups, so the best count is
    where they cross: found by bisection, then compared with its neighbour and with no device at all."""
    def sides(count: int) -> tuple[float, float, set[int]]:
        on_device = {members[i].index for i in spread(count, len(members))}
        device = [s.numel for s in members if s.index in on_device]
        cpu = sum(s.numel for s in members if s.index not in on_device)
        return device_pipeline_seconds(device, slots, profile), cpu_seconds(cpu, bool(device), profile), on_device

    low, high = 1, len(members)  # the first count whose device time reaches the CPU's
    while low < high:
        mid = (low + high) // 2
        device_s, cpu_s, _ = sides(mid)
        if device_s >= cpu_s:
            high = mid
        else:
            low = mid + 1
    best_time, best = None, set()
    for count in sorted({0, max(low - 1, 0), low}):
        device_s, cpu_s, on_device = sides(count)
        if best_time is None or max(device_s, cpu_s) < best_time:
            best_time, best = max(device_s, cpu_s), on_device
    return best
