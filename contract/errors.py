"""How the contract reports bad input: each offending field by its path in the spec, and why."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class SpecError(ValueError):
    """A spec that cannot run; `violations` names each bad field (paths relative to the spec)."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))
