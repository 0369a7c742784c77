"""The Launcher protocol: how the reconciler starts, watches and stops the ranks of an attempt without
knowing whether they are local processes or Kubernetes pods.

Every method is idempotent and takes everything it needs from its arguments (what `launch` returned is
stored with the attempt and handed back), so a restarted control plane picks up where it stopped."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.spec import JobSpec


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
    spec: JobSpec
    tp: int
    pp: int
    dp: int
    start_step: int
    job_token: str
    # How ranks reach the control plane's TrainerService.
    server_address: str

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class AttemptStatus:
    phase: Phase
    reason: str = ""
    message: str = ""


class Launcher(Protocol):
    def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Starts the attempt's ranks (or finds them already started) and returns what finds them again."""

    def status(self, ref: AttemptRef) -> AttemptStatus: ...

    def stop(self, ref: AttemptRef, grace_seconds: float = 10.0) -> None:
        """Stops every rank of the attempt (the whole gang); a no-op once they are gone."""

    def logs(self, ref: AttemptRef, rank: int, follow: bool,
             attempt_ended: Callable[[], bool]) -> Iterator[str]:
        """A rank's log from its start; with follow, keeps yielding until `attempt_ended()` and the log is read."""
