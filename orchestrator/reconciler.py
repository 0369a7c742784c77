"""The reconciler: a level-triggered loop that moves every unfinished job toward its end.

Each pass reads a job's state from the database, looks at its ranks through the launcher, and writes the
next state back. It keeps nothing in memory between passes, so it may be killed at any point: the next
control plane to start reads the same rows and converges. External actions (launching, stopping) happen
outside database transactions and are idempotent; their results are written afterwards.

An attempt's layout comes from the planner, fitted to the ranks the launcher can start now; it resumes from
the job's newest committed checkpoint. With too few ranks for any valid layout the job waits (QUEUED or
RESTARTING, reason WaitingForRanks) and is planned again on every pass: the spec's own layout is always
valid, so a job can always run once enough ranks are back and is never failed for want of them.

Failures spend separate budgets: a preemption (the ranks checkpointed and exited) max_preemptions, a hang
(a rank's heartbeats stopped for hang_timeout_seconds) max_hang_restarts, anything else max_restarts."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from orchestrator.auth import job_token
from orchestrator.launcher import PREEMPTED, AttemptRef, Launcher, LaunchRequest, Phase
from orchestrator.lifecycle import record_event, transition
from orchestrator.planner import NoLayout, plan_layout, spec_at_layout
from contract.spec import JobSpec, parse_spec
from orchestrator.store import Attempt, AttemptState, Database, Job, JobState, RankStatus, utcnow

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.LAUNCHING, JobState.RUNNING, JobState.RESTARTING)
HUNG = "Hung"
WAITING_FOR_RANKS = "WaitingForRanks"
MAX_RANKS_NAMED = 5  # in a hang's message


@dataclass(frozen=True)
class ReconcilerSettings:
    interval_seconds: float = 0.5
    # Backoff before a restart is min(base * 2**(n-1), max), n counting the attempts in a row that ended
    # without committing a checkpoint: an attempt that made progress resets it to the base.
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 60.0
    stop_grace_seconds: float = 10.0
    # For the rest of a gang after a crash or hang: a half-dead gang cannot checkpoint anyway, so the
    # survivors are killed at once (their SIGTERM handler would only wait in a collective that never ends).
    failed_stop_grace_seconds: float = 0.0
    # A rank that never sent a heartbeat, or whose last one said it had trained the final step, is hung only
    # after max(hang timeout, this): starting and ending a rank (imports, device set-up, the last checkpoint,
    # teardown) take longer than a step, and a short hang timeout is about steps.
    hang_start_end_grace_seconds: float = 60.0


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
        # Heartbeats cannot arrive while no control plane runs, so hangs are judged only once this one has
        # been up for a job's hang timeout. A fact about this process, not job state (monotonic seconds).
        self.started_at = time.monotonic()

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
            self._wake.wait(self._seconds_to_next_pass())

    def _seconds_to_next_pass(self) -> float:
        """The tick, or less when a restart's backoff ends sooner: a restart should not wait for the tick."""
        with self.db.read() as session:
            due = session.scalar(select(func.min(Job.next_attempt_time)).where(Job.state == JobState.RESTARTING))
        if due is None:
            return self.settings.interval_seconds
        until_due = (due - utcnow()).total_seconds()
        return self.settings.interval_seconds if until_due <= 0 else min(self.settings.interval_seconds, until_due)

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
        """Plans and records a new attempt (the launch itself follows in `_observe`, so a crash in between
        is safe). With too few ranks for any valid layout, records why the job waits and returns False."""
        with self.db.read() as session:
            job = session.get(Job, name)
            spec = parse_spec(job.spec)
            told = (job.state_reason, job.state_message)
        available = self.launcher.capacity()  # outside any transaction: a launcher may have to ask a cluster
        if available is not None:
            available = max(0, available - self._ranks_held_by_other_jobs(name))
        try:
            plan = plan_layout(spec, available)
        except NoLayout as exc:
            if told != (WAITING_FOR_RANKS, exc.reason):
                self._wait_for_ranks(name, from_state, exc.reason)
            return False
        with self.db.session() as session:
            job = session.get(Job, name)
            if JobState(job.state) is not from_state or job.cancel_requested:
                return False
            number = (job.current_attempt.number if job.current_attempt else 0) + 1
            start_step = job.checkpoint_step  # the trainer resumes from the newest valid one it finds
            attempt = Attempt(job_name=name, number=number, state=AttemptState.PENDING, tp=plan.tp, pp=plan.pp,
                              dp=plan.dp, world_size=plan.world_size, start_step=start_step, launch_info={})
            job.attempts.append(attempt)
            p = spec.parallelism
            reshaped = (plan.tp, plan.pp, plan.dp) != (p.tp, p.pp, p.dp)
            message = (f"attempt {number}: tp={plan.tp} pp={plan.pp} dp={plan.dp}, {plan.world_size} ranks, "
                       f"from step {start_step}")
            if start_step:
                message += " (the newest committed checkpoint)"
            if reshaped:
                message += f"; {plan.reason}"
            transition(session, job, JobState.LAUNCHING, "AttemptCreated", message, attempt=number)
            if reshaped:
                record_event(session, job, "Planned", "Reshaped", plan.reason, attempt=number)
        return True

    def _ranks_held_by_other_jobs(self, name: str) -> int:
        """The launcher's capacity is for all jobs: the ranks of other jobs' attempts that have not ended are
        taken (a failed or cancelled attempt's gang is stopped before its attempt ends)."""
        with self.db.read() as session:
            held = session.scalar(select(func.coalesce(func.sum(Attempt.world_size), 0)).where(
                Attempt.job_name != name, Attempt.state.in_([AttemptState.PENDING, AttemptState.RUNNING])))
        return int(held)

    def _wait_for_ranks(self, name: str, from_state: JobState, reason: str) -> None:
        """The job stays where it is (QUEUED or RESTARTING) and says why; later passes plan it again."""
        with self.db.session() as session:
            job = session.get(Job, name)
            if JobState(job.state) is not from_state or job.cancel_requested:
                return
            job.state_reason, job.state_message = WAITING_FOR_RANKS, reason
            job.update_time = utcnow()
            last = job.current_attempt
            record_event(session, job, "Waiting", WAITING_FOR_RANKS, reason, attempt=last.number if last else None)

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
        if status.phase is Phase.PENDING:
            return
        if status.phase is Phase.RUNNING and state is JobState.RUNNING:
            self._check_heartbeats(name, ref)  # else nothing new: no write transaction on every tick
            return
        if status.phase is Phase.FAILED:
            # Stop the rest of the gang before deciding: a half-dead gang only hangs in collectives. Preempted
            # ranks leave by themselves once they have checkpointed: they get the full grace (usually a no-op).
            preempted = status.reason == PREEMPTED
            self.launcher.stop(ref, self.settings.stop_grace_seconds if preempted
                               else self.settings.failed_stop_grace_seconds)
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
                self._record_failure(session, job, attempt, status.reason, status.message, status.retryable)

    def _check_heartbeats(self, name: str, ref: AttemptRef) -> None:
        """A running attempt with a rank silent for the job's hang timeout is hung: the failure is recorded
        first (the decision is durable), then the gang is stopped."""
        with self.db.read() as session:
            job = session.get(Job, name)
            timeout = parse_spec(job.spec).restart_policy.hang_timeout_seconds
            attempt = job.current_attempt
            if time.monotonic() - self.started_at < timeout or attempt.number != ref.attempt:
                return
            beats = {rank: (last, step) for rank, last, step in session.execute(
                select(RankStatus.rank, RankStatus.last_heartbeat, RankStatus.step)
                .where(RankStatus.job_name == name, RankStatus.attempt == attempt.number))}
            hang = _hang_message(attempt, beats, job.total_steps, timeout,
                                 max(timeout, self.settings.hang_start_end_grace_seconds))
        if not hang:
            return
        with self.db.session() as session:
            job = session.get(Job, name)
            attempt = job.current_attempt
            if attempt.number != ref.attempt or JobState(job.state) is not JobState.RUNNING or job.cancel_requested:
                return
            self._record_failure(session, job, attempt, HUNG, hang)
        self.launcher.stop(ref, self.settings.failed_stop_grace_seconds)

    def _launch(self, name: str, ref: AttemptRef) -> None:
        with self.db.session() as session:
            job = session.get(Job, name)
            attempt = job.current_attempt
            request = LaunchRequest(
                job=name, job_uid=job.uid, attempt=attempt.number,
                spec=spec_at_layout(parse_spec(job.spec), attempt.tp, attempt.pp, attempt.dp),
                tp=attempt.tp, pp=attempt.pp, dp=attempt.dp, start_step=attempt.start_step,
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

    def _record_failure(self, session, job: Job, attempt: Attempt, reason: str, message: str,
                        retryable: bool = True) -> None:
        """Ends the attempt and restarts the job if the failure's own budget has room (and another attempt could
        fare better), else fails it."""
        _end_attempt(attempt, AttemptState.FAILED, message)
        if not retryable:
            transition(session, job, JobState.FAILED, reason, f"{message}; not retried: another attempt would fail "
                       "the same way", attempt=attempt.number)
            return
        budget = _budget_for(job, parse_spec(job.spec), reason)
        used = getattr(job, budget.counter)
        if used < budget.limit:
            used += 1
            setattr(job, budget.counter, used)
            backoff = min(self.settings.restart_backoff_seconds * 2 ** max(0, _failures_without_progress(job) - 1),
                          self.settings.restart_backoff_max_seconds)
            job.next_attempt_time = utcnow() + timedelta(seconds=backoff)
            transition(session, job, JobState.RESTARTING, reason,
                       f"{message}; {budget.noun} {used} of {budget.limit}, next attempt in {backoff:.0f} s",
                       attempt=attempt.number)
        else:
            spent = f"{budget.noun} budget of {budget.limit} spent" if budget.limit else f"no {budget.noun}s allowed"
            transition(session, job, JobState.FAILED, reason, f"{message}; {spent}", attempt=attempt.number)


def _failures_without_progress(job: Job) -> int:
    """How many attempts in a row, newest first, ended without committing a new checkpoint. An attempt made
    progress if the job's newest checkpoint (for the current attempt) or the next attempt's start step is past
    the step it started from."""
    count, reached = 0, job.checkpoint_step
    for attempt in reversed(job.attempts):
        if reached > attempt.start_step:
            break
        count += 1
        reached = attempt.start_step
    return count


@dataclass(frozen=True)
class _Budget:
    counter: str  # the Job column that counts its use
    limit: int
    noun: str  # for messages: "preemption 1 of 10"


def _budget_for(job: Job, spec: JobSpec, reason: str) -> _Budget:
    """A preemption is the cluster's doing and a hang is nobody's for sure: neither spends the crash budget."""
    policy = spec.restart_policy
    if reason == PREEMPTED:
        return _Budget("preemption_count", policy.max_preemptions, "preemption")
    if reason == HUNG:
        return _Budget("hang_restart_count", policy.max_hang_restarts, "hang restart")
    return _Budget("restart_count", job.max_restarts, "restart")


def _hang_message(attempt: Attempt, beats: dict[int, tuple[datetime, int]], total_steps: int, timeout: float,
                  slow_phase_timeout: float) -> str:
    """Names the ranks that went silent, or "" if none did: a rank whose last heartbeat (rank -> (time,
    step)) is older than `timeout`, or than `slow_phase_timeout` if it had trained the final step, or one
    that sent none in the `slow_phase_timeout` since the attempt started."""
    now = utcnow()
    started = attempt.start_time or attempt.create_time
    silent = []
    for rank in range(attempt.world_size):
        last, step = beats.get(rank, (None, 0))
        quiet = (now - (last or started)).total_seconds()
        if last is None:
            if quiet > slow_phase_timeout:
                silent.append(f"rank {rank} (no heartbeat in the {quiet:.0f} s since the attempt started)")
        elif quiet > (slow_phase_timeout if step >= total_steps else timeout):
            silent.append(f"rank {rank} (last heartbeat {quiet:.0f} s ago, at step {step})")
    if not silent:
        return ""
    named = ", ".join(silent[:MAX_RANKS_NAMED]) + (f" and {len(silent) - MAX_RANKS_NAMED} more"
                                                   if len(silent) > MAX_RANKS_NAMED else "")
    return f"hung: {named}; restart_policy.hang_timeout_seconds is {timeout:g}"


def _end_attempt(attempt: Attempt, state: AttemptState, reason: str) -> None:
    attempt.state = state
    attempt.end_time = utcnow()
    attempt.end_reason = reason
