"""How the contract reports bad input: each offending field by its path in the spec, and why."""

from __future__ import annotations

from dataclasses import dataclass

# A refusal quotes at most this much of what it refuses: an overlong input (a 1 MB env name, say) is not
# echoed back whole, and an error stays far below gRPC's metadata limit.
MAX_FIELD_TEXT = 200
MAX_DESCRIPTION_TEXT = 500


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with an ellipsis if it is longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "field", clip(self.field, MAX_FIELD_TEXT))
        object.__setattr__(self, "description", clip(self.description, MAX_DESCRIPTION_TEXT))

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class SpecError(ValueError):
    """A spec that cannot run; `violations` names each bad field (paths relative to the spec)."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))
