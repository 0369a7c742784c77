"""Subgroups: each flat host tensor (a ZeRO-1 partition of fp32 master weights, with its gradient and both Adam
moments) cut into contiguous ranges of about `size` elements. A range never crosses a parameter, so never a
parameter group: one update call covers one group's hyperparameters.

Boundaries fall on multiples of ALIGN elements from the tensor's start: torch's fused CPU Adam runs vector lanes
and a scalar tail that round differently, so only aligned cuts give results bit-identical to one update of the
whole tensor (and aligned copies are faster too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 64
DEFAULT_SUBGROUP_SIZE = 10_000_000


@dataclass(frozen=True)
class Subgroup:
    index: int        # position in the optimizer's table (group order, then parameter order, then offset)
    group: int        # index of the parameter group in the optimizer's full list
    param: int        # index of the parameter inside its group
    start: int        # first element in the flattened parameter
    numel: int

    @property
    def end(self) -> int:
        return self.start + self.numel


def split(numel: int, size: int) -> list[tuple[int, int]]:
    """(start, numel) ranges covering `numel` elements, each at most `size` (rounded up to ALIGN) long and
    starting on a multiple of ALIGN; equal lengths except the last."""
    if size <= 0:
        raise ValueError(f"subgroup_size must be positive, got {size}")
    size = -(-size // ALIGN) * ALIGN
    return [(start, min(size, numel - start)) for start in range(0, numel, size)]


def build_table(group_numels: list[list[int]], size: int) -> list[Subgroup]:
    """The subgroups of every parameter, given each group's parameter sizes (in elements)."""
    table: list[Subgroup] = []
    for g, numels in enumerate(group_numels):
        for p, numel in enumerate(numels):
            for start, n in split(numel, size):
                table.append(Subgroup(len(table), g, p, start, n))
    return table


def views(tensor: torch.Tensor, sub: Subgroup) -> torch.Tensor:
    """The subgroup's range of a tensor shaped like its parameter (a view: writes go to the tensor)."""
    return tensor.view(-1)[sub.start:sub.end]


def spread(count: int, total: int) -> list[int]:
    """`count` of the positions 0..total-1, spread evenly (the first one at 0), so that a list processed in
    order hands work to both sides from its start."""
    if not 0 <= count <= total:
        raise ValueError(f"cannot spread {count} over {total}")
    return [i for i in range(total) if (i * count) // total != ((i - 1) * count) // total] if count else []


@dataclass(frozen=True)
class Placement:
    """Which subgroups the device updates (by table index), and the ring's number of device slots (K)."""
    on_device: frozenset[int] = frozenset()
    slots: int = 0

    def __post_init__(self):
        if self.on_device and self.slots < 1:
            raise ValueError("placement: subgroups on the device need at least one slot")
        if self.slots < 0:
            raise ValueError(f"placement: slots must be >= 0, got {self.slots}")

    @staticmethod
    def all_cpu() -> "Placement":
        return Placement()

    @staticmethod
    def all_device(table: list[Subgroup], slots: int) -> "Placement":
        return Placement(frozenset(s.index for s in table), slots)

    @staticmethod
    def fraction(table: list[Subgroup], fraction: float, slots: int) -> "Placement":
        """About `fraction` of each group's subgroups on the device, spread evenly within the group (each step()
        call of DeepSpeed covers one group, so both sides must have work in every group)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"placement: device fraction must be in [0, 1], got {fraction}")
        chosen: set[int] = set()
        for members in by_group(table).values():
            for i in spread(round(fraction * len(members)), len(members)):
                chosen.add(members[i].index)
        return Placement(frozenset(chosen), slots if chosen else 0)

    @staticmethod
    def stride(table: list[Subgroup], every: int, slots: int) -> "Placement":
        """Every `every`-th subgroup on the device (the fixed placement of the Deep Optimizer States code)."""
        chosen = frozenset(s.index for s in table if s.index % every == 0)
        return Placement(chosen, slots if chosen else 0)

    def record(self) -> dict:
        """What a checkpoint manifest keeps of it."""
        return {"on_device": sorted(self.on_device), "slots": self.slots}


def by_group(table: list[Subgroup]) -> dict[int, list[Subgroup]]:
    groups: dict[int, list[Subgroup]] = {}
    for s in table:
        groups.setdefault(s.group, []).append(s)
    return groups
