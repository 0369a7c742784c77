"""The Launcher protocol: how the reconciler starts, watches and stops the ranks of an attempt without
knowing whether they are local processes or Kubernetes pods.

Every method is idempotent and takes everything it needs from its arguments (what `launch` returned is
stored with the attempt and handed back), so a restarted control plane picks up where it stopped."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from contract.spec import JobSpec


# The reason of a FAILED attempt whose ranks were taken away (SIGTERM, eviction, a lost node): it spends the
# preemption budget, not the crash budget.
PREEMPTED = "Preempted"
# The trainer's exit code after SIGTERM once it has checkpointed (trainers.main.EXIT_PREEMPTED).
PREEMPTED_EXIT_CODE = 4


class Phase(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class AttemptRef:
    """Names one attempt of one job, plus what its launch recorded."""

    job: str
    attempt: int
    launch_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchRequest:
    job: str
    job_uid: str
    attempt: int
    # The spec the ranks run: the job's spec at this attempt's layout (planner.spec_at_layout), so its
    # parallelism is (tp, pp, dp) below and resources.ranks their product.
    spec: JobSpec
    tp: int
    pp: int
    dp: int
    start_step: int
    job_token: str
    # How ranks reach the control plane's TrainerService.
    server_address: str

    def __post_init__(self) -> None:
        p = self.spec.parallelism
        if (p.tp, p.pp, p.dp) != (self.tp, self.pp, self.dp) or self.spec.resources.ranks != self.world_size:
            raise ValueError(f"the spec's layout tp={p.tp} pp={p.pp} dp={p.dp} ({self.spec.resources.ranks} ranks) "
                             f"is not the attempt's tp={self.tp} pp={self.pp} dp={self.dp}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class AttemptStatus:
    phase: Phase
    reason: str = ""  # for FAILED: "Preempted" (the ranks were told to stop and checkpointed) or why it failed
    message: str = ""
    # False for a failure another attempt would only repeat (an image that cannot be pulled): the job fails now.
    retryable: bool = True


class Launcher(Protocol):
    # Set by the control plane: called (from any thread) when one of the launcher's ranks ends, so the
    # reconciler looks at once instead of at its next tick. Correctness never depends on it.
    on_rank_exit: Callable[[], None] | None

    def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Starts the attempt's ranks (or finds them already started) and returns what finds them again."""

    def status(self, ref: AttemptRef) -> AttemptStatus: ...

    def stop(self, ref: AttemptRef, grace_seconds: float = 10.0) -> None:
        """Stops every rank of the attempt (the whole gang); a no-op once they are gone. SIGTERM first (a
        rank then checkpoints and exits), SIGKILL for what is left after the grace; a grace of 0 kills at once."""

    def close(self) -> None:
        """Releases what the launcher itself holds (watches, connections); the ranks run on."""

    def capacity(self) -> int | None:
        """How many ranks it could start now (None: no limit); the planner fits the next attempt to it."""

    def logs(self, ref: AttemptRef, rank: int, follow: bool,
             attempt_ended: Callable[[], bool]) -> Iterator[str]:
        """A rank's log from its start; with follow, keeps yielding until `attempt_ended()` and the log is read."""
