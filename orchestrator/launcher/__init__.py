"""The Launcher protocol: how the reconciler starts, watches and stops the ranks of an attempt without
knowing whether they are local processes or Kubernetes pods.

Every method is idempotent and takes everything it needs from its arguments (what `launch` returned is
stored with the attempt and handed back), so a restarted control plane picks up where it stopped."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from contract.spec import FieldViolation, JobSpec
from orchestrator.launcher.logs import LogRange, LogRead


# The reason of a FAILED attempt whose ranks were taken away (SIGTERM, eviction, a lost node): it spends the
# preemption budget, not the crash budget.
PREEMPTED = "Preempted"
# The trainer's exit code after SIGTERM once it has checkpointed (trainers.main.EXIT_PREEMPTED).
PREEMPTED_EXIT_CODE = 4


class LogsUnavailable(Exception):
    """A rank's log cannot be read now (its node does not answer); the text says why. Callers answer
    UNAVAILABLE: trying again later may work."""


class Phase(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class RankTls:
    """What ranks need to reach a control plane that serves TLS, as PEM text (contract.rank_env)."""

    server_ca: str  # what they trust for its certificate
    client_cert: str | None = None  # what they present when it wants clients' certificates (mutual TLS)
    client_key: str | None = None


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
    # TLS for the ranks' channel to that address (None: plaintext).
    tls: RankTls | None = None

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
    # Where a spec's data.path may lead, as the ranks see it (contract.reach checks CreateJob against it).
    data_roots: tuple[str, ...]

    def directory_violations(self, spec: JobSpec) -> list[FieldViolation]:
        """For CreateJob: the job's directories as this launcher can see them before any rank starts (a
        symlink already leading out), each refusal naming its field; [] where it cannot see them."""

    def subscribe(self, notify: Callable[[str], None]) -> None:
        """Called once by the control plane's controller runtime: from then on the launcher calls
        `notify(job_name)` (from any thread) when a rank of that job ends or its pod goes, so the job is looked
        at at once rather than at its next timer. Correctness never depends on it."""

    def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Starts the attempt's ranks (or finds them already started) and returns what finds them again."""

    def status(self, ref: AttemptRef) -> AttemptStatus: ...

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        """Asks every rank of the attempt (the whole gang) to stop, and returns at once: it never waits for
        them. A grace above 0: SIGTERM (a rank then checkpoints and exits); 0: killed now. The caller records
        the grace's deadline and calls again with 0 for what is left after it; see `ranks_gone`. Idempotent."""

    def ranks_gone(self, ref: AttemptRef) -> bool:
        """True once no rank of the attempt runs any more (a new attempt may take their place)."""

    def close(self) -> None:
        """Releases what the launcher itself holds (watches, connections); the ranks run on."""

    def capacity(self) -> int | None:
        """How many ranks it could start now (None: no limit); the planner fits the next attempt to it."""

    def logs(self, ref: AttemptRef, rank: int, follow: bool, attempt_ended: Callable[[], bool],
             where: LogRange = LogRange()) -> Iterator[LogRead]:
        """A rank's log in pieces of at most LOG_READ_BYTES, from `where` (its start by default); with follow,
        keeps yielding until `attempt_ended()` and the log is read. It never waits: while following, an empty
        read says nothing new is there yet, and the caller asks again after a pause (orchestrator/launcher/logs.py).
        Raises LogsUnavailable when the log exists but cannot be reached now."""
