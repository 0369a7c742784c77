"""The reconciler: a level-triggered loop that moves every unfinished job toward its end.

Each pass reads a job's state from the database, looks at its ranks through the launcher, and writes the
next state back. It keeps nothing in memory between passes, so it may be killed at any point: the next
control plane to start reads the same rows and converges. External actions (launching, stopping) happen
outside database transactions and are idempotent; their results are written afterwards."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from orchestrator.auth import job_token
from orchestrator.launcher import AttemptRef, Launcher, LaunchRequest, Phase
from orchestrator.lifecycle import record_event, transition
from orchestrator.spec import parse_spec
from orchestrator.store import Attempt, AttemptState, Database, Job, JobState, utcnow

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.LAUNCHING, JobState.RUNNING, JobState.RESTARTING)


@dataclass(frozen=True)
class ReconcilerSettings:
    interval_seconds: float = 0.5
    # Backoff before restart n (1-based) is min(base * 2**(n-1), max).
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 60.0
    stop_grace_seconds: float = 10.0


class Reconciler:
    def __init__(self, db: Database, launcher: Launcher, credential_key: bytes, server_address: str,
                 settings: ReconcilerSettings = ReconcilerSettings()):
        self.db = db
        self.launcher = launcher
        self.credential_key = credential_key
        self.server_address = server_address
        self.settings = settings
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Asks for a pass now (after a user's change) instead of at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.reconcile_all()
            except Exception:
                log.exception("reconcile pass failed")
            self._wake.wait(self.settings.interval_seconds)

    def reconcile_all(self) -> None:
        with self.db.read() as session:
            names = session.scalars(select(Job.name).where(Job.state.in_(ACTIVE_STATES))
                                    .order_by(Job.create_time)).all()
        for name in names:
            if self._stopping.is_set():
                return
            try:
                self.reconcile(name)
            except Exception:
                log.exception("reconciling job %s failed", name)

    # -- one job -----------------------------------------------------------------------------------------

    def reconcile(self, name: str) -> None:
        with self.db.session() as session:
            job = session.get(Job, name)
            if job is None or JobState(job.state).terminal:
                return
            state = JobState(job.state)
            attempt = job.current_attempt
            ref = AttemptRef(job.name, attempt.number, dict(attempt.launch_info)) if attempt else None
            cancel = job.cancel_requested

        if cancel:
            self._cancel(name, ref)
        elif state is JobState.QUEUED:
            if self._start_attempt(name, from_state=JobState.QUEUED):
                self.reconcile(name)  # launch it now rather than at the next tick
        elif state is JobState.RESTARTING:
            if self._restart_when_due(name, ref):
                self.reconcile(name)
        elif ref is not None:
            self._observe(name, ref, state)

    def _cancel(self, name: str, ref: AttemptRef | None) -> None:
        if ref is not None:
            self.launcher.stop(ref, self.settings.stop_grace_seconds)
        with self.db.session() as session:
            job = session.get(Job, name)
            attempt = job.current_attempt
            if attempt is not None and not AttemptState(attempt.state).terminal:
                _end_attempt(attempt, AttemptState.CANCELLED, "cancelled by user")
            transition(session, job, JobState.CANCELLED, "CancelRequested", "cancelled by user",
                       attempt=attempt.number if attempt else None)

    def _start_attempt(self, name: str, from_state: JobState) -> bool:
        """Records a new attempt (the launch itself follows in `_observe`, so a crash in between is safe)."""
        with self.db.session() as session:
            job = session.get(Job, name)
            if JobState(job.state) is not from_state or job.cancel_requested:
                return False
            spec = parse_spec(job.spec)
            number = (job.current_attempt.number if job.current_attempt else 0) + 1
            p = spec.parallelism
            attempt = Attempt(job_name=name, number=number, state=AttemptState.PENDING, tp=p.tp, pp=p.pp,
                              dp=p.dp, world_size=p.world_size, start_step=0, launch_info={})
            job.attempts.append(attempt)
            transition(session, job, JobState.LAUNCHING, "AttemptCreated",
                       f"attempt {number}: tp={p.tp} pp={p.pp} dp={p.dp}, {p.world_size} ranks, from step 0",
                       attempt=number)
        return True

    def _restart_when_due(self, name: str, ref: AttemptRef | None) -> bool:
        with self.db.read() as session:
            job = session.get(Job, name)
            due = job.next_attempt_time is None or job.next_attempt_time <= utcnow()
        if not due:
            return False
        if ref is not None:
            self.launcher.stop(ref, self.settings.stop_grace_seconds)  # no rank of the old gang survives
        return self._start_attempt(name, from_state=JobState.RESTARTING)

    def _observe(self, name: str, ref: AttemptRef, state: JobState) -> None:
        if not ref.launch_info:
            self._launch(name, ref)
            return
        status = self.launcher.status(ref)
        if status.phase is Phase.PENDING or (status.phase is Phase.RUNNING and state is JobState.RUNNING):
            return  # nothing new: no write transaction (on SQLite, no write lock) on every tick
        if status.phase is Phase.FAILED:
            # Stop the rest of the gang before deciding: a half-dead gang only hangs in collectives.
            self.launcher.stop(ref, self.settings.stop_grace_seconds)
        with self.db.session() as session:
            job = session.get(Job, name)
            attempt = job.current_attempt
            if attempt.number != ref.attempt or JobState(job.state).terminal or job.cancel_requested:
                return  # changed while we looked; the next pass sees the new state
            state = JobState(job.state)
            if status.phase is Phase.RUNNING:
                if attempt.state == AttemptState.PENDING:
                    attempt.state = AttemptState.RUNNING
                    attempt.start_time = utcnow()
                if state is JobState.LAUNCHING:
                    transition(session, job, JobState.RUNNING, "RanksRunning",
                               f"all {attempt.world_size} ranks of attempt {attempt.number} are running",
                               attempt=attempt.number)
            elif status.phase is Phase.SUCCEEDED:
                _end_attempt(attempt, AttemptState.SUCCEEDED, "all ranks exited 0")
                job.current_step = max(job.current_step, job.total_steps)
                transition(session, job, JobState.SUCCEEDED, "Completed",
                           f"trained {job.total_steps} steps", attempt=attempt.number)
            else:
                self._record_failure(session, job, attempt, status.reason, status.message)

    def _launch(self, name: str, ref: AttemptRef) -> None:
        with self.db.session() as session:
            job = session.get(Job, name)
            attempt = job.current_attempt
            request = LaunchRequest(
                job=name, job_uid=job.uid, attempt=attempt.number, spec=parse_spec(job.spec), tp=attempt.tp,
                pp=attempt.pp, dp=attempt.dp, start_step=attempt.start_step,
                job_token=job_token(self.credential_key, job.uid, attempt.number),
                server_address=self.server_address)
        try:
            info = self.launcher.launch(request)
        except Exception as exc:  # a launch that cannot happen is the attempt's failure, not the loop's
            log.exception("launching %s attempt %d failed", name, ref.attempt)
            with self.db.session() as session:
                job = session.get(Job, name)
                self._record_failure(session, job, job.current_attempt, "LaunchFailed", str(exc))
            return
        with self.db.session() as session:
            job = session.get(Job, name)
            attempt = job.current_attempt
            attempt.launch_info = info
            record_event(session, job, "Launched", "RanksStarted",
                         f"started {attempt.world_size} ranks of attempt {attempt.number}", attempt=attempt.number)

    def _record_failure(self, session, job: Job, attempt: Attempt, reason: str, message: str) -> None:
        _end_attempt(attempt, AttemptState.FAILED, message)
        if job.restart_count < job.max_restarts:
            job.restart_count += 1
            backoff = min(self.settings.restart_backoff_seconds * 2 ** (job.restart_count - 1),
                          self.settings.restart_backoff_max_seconds)
            job.next_attempt_time = utcnow() + timedelta(seconds=backoff)
            transition(session, job, JobState.RESTARTING, reason,
                       f"{message}; restart {job.restart_count} of {job.max_restarts} in {backoff:.0f} s",
                       attempt=attempt.number)
        else:
            budget = f"restart budget of {job.max_restarts} spent" if job.max_restarts else "no restarts allowed"
            transition(session, job, JobState.FAILED, reason, f"{message}; {budget}", attempt=attempt.number)


def _end_attempt(attempt: Attempt, state: AttemptState, reason: str) -> None:
    attempt.state = state
    attempt.end_time = utcnow()
    attempt.end_reason = reason
