"""The job controller: moves each unfinished job one step toward its end per pass, on the controller runtime.

A pass reads the job's row (and its current attempt), looks at its ranks through the launcher, and writes
what changed in one transaction; external actions (launching, signalling a stop) happen outside any
transaction, are idempotent, and follow the write that decided them. Nothing lives in memory between
passes, so the control plane may be killed at any point: the next one reads the same rows and converges.

A job's states: QUEUED → LAUNCHING → RUNNING → SUCCEEDED, with RESTARTING (a failed attempt with budget
left), FAILED and CANCELLED. An attempt's layout comes from the planner, fitted to the ranks the launcher can
start now minus those other jobs' attempts hold; with too few ranks for any valid layout the job waits
(QUEUED or RESTARTING, reason WaitingForRanks) and is planned again when ranks are freed or at the resync.

A stop never holds a worker: it is a durable phase of the attempt. The pass that decides it (a cancel, a
failure, a hang) records the decision with the grace's deadline and only signals the ranks; later passes
look whether they are gone and kill what is left after the deadline. The attempt keeps its ranks (and
the capacity they use) until they are gone; only then does it end, does a cancelled or failed job reach its
end state, and may a restarting job start its next attempt."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import lazyload

from contract.spec import JobSpec, parse_spec
from orchestrator.auth import job_token
from orchestrator.controller.failure_policy import HUNG, decide, hang_message
from orchestrator.controller.runtime import ControllerRuntime, Requeue
from orchestrator.launcher import PREEMPTED, AttemptRef, Launcher, LaunchRequest, Phase
from orchestrator.lifecycle import record_event, transition
from orchestrator.planner import LayoutPlan, NoLayout, plan_layout, spec_at_layout
from orchestrator.store import Attempt, AttemptState, Database, Event, Job, JobState, RankStatus, utcnow

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.LAUNCHING, JobState.RUNNING, JobState.RESTARTING)
WAITING_FOR_RANKS = "WaitingForRanks"
SPECS_CACHED = 4096  # parsed specs kept, by job uid (a spec never changes)


@dataclass(frozen=True)
class ReconcilerSettings:
    # How often a launching, running or stopping job is looked at without a notification (its ranks'
    # status, heartbeats, a stop's progress).
    interval_seconds: float = 0.5
    # Every unfinished job is looked at this often even when nothing was notified.
    resync_seconds: float = 30.0
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


class JobController:
    def __init__(self, db: Database, launcher: Launcher, credential_key: bytes, server_address: str,
                 settings: ReconcilerSettings = ReconcilerSettings(), workers: int = 4):
        self.db = db
        self.launcher = launcher
        self.credential_key = credential_key
        self.server_address = server_address
        self.settings = settings
        self.runtime = ControllerRuntime("jobs", self.reconcile, self.unfinished_jobs, workers,
                                         settings.resync_seconds)
        # The launcher's capacity is shared by every job: planning and recording an attempt is one critical
        # section, or two workers would hand out the same free ranks.
        self._admission = threading.Lock()
        self._specs: OrderedDict[str, JobSpec] = OrderedDict()
        self._specs_lock = threading.Lock()
        # Heartbeats cannot arrive while no control plane runs, so hangs are judged only once this one has
        # been up for a job's hang timeout. A fact about this process, not job state (monotonic seconds).
        self.started_at = time.monotonic()

    # -- wiring ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.launcher.subscribe(self.runtime.notify)
        self.runtime.start()

    def stop(self) -> None:
        self.runtime.stop()

    def wake(self, job_name: str | None = None) -> None:
        """A user changed a job (created, cancelled): look at it now. Without a name, look at every job."""
        if job_name is None:
            self.runtime.resync()
        else:
            self.runtime.notify(job_name.removeprefix("jobs/"))

    def unfinished_jobs(self) -> list[str]:
        """Every job a pass may still move, oldest first (a stopping attempt's job is not finished yet)."""
        with self.db.read() as session:
            return list(session.scalars(select(Job.name).where(Job.state.in_(ACTIVE_STATES))
                                        .order_by(Job.create_time, Job.name)))

    def _wake_waiting(self) -> None:
        """Ranks were freed: the jobs waiting for them are planned again, oldest first."""
        with self.db.read() as session:
            waiting = session.scalars(select(Job.name).where(
                Job.state.in_((JobState.QUEUED, JobState.RESTARTING)), Job.state_reason == WAITING_FOR_RANKS)
                .order_by(Job.create_time, Job.name)).all()
        self.runtime.queue.add_all(waiting)

    # -- one pass ----------------------------------------------------------------------------------------

    def reconcile(self, name: str) -> Requeue:
        """One pass over one job; returns when to look again (see runtime.Requeue)."""
        with self.db.read() as session:
            job = session.scalar(select(Job).where(Job.name == name).options(lazyload(Job.labels)))
        if job is None:
            return None
        attempt = job.current_attempt
        if attempt is not None and attempt.stopping:
            return self._finish_stop(job, attempt)
        state = JobState(job.state)
        if state.terminal:
            return None
        if job.cancel_requested:
            return self._cancel(job, attempt)
        if state is JobState.QUEUED:
            return self._admit(job)
        if state is JobState.RESTARTING:
            until_due = (job.next_attempt_time - utcnow()).total_seconds() if job.next_attempt_time else 0
            return until_due if until_due > 0 else self._admit(job)
        if not attempt.launch_info:
            return self._launch(job, attempt)
        return self._observe(job, attempt)

    # -- starting an attempt -----------------------------------------------------------------------------

    def _admit(self, job: Job) -> Requeue:
        """Plans and records a new attempt (the launch follows in the next pass, so a crash in between is
        safe). With too few ranks for any valid layout, records why the job waits."""
        spec = self._spec(job)
        with self._admission:
            available = self.launcher.capacity()  # outside any transaction: a launcher may ask a cluster
            if available is not None:
                available = max(0, available - self._ranks_held_by_other_jobs(job.name))
            try:
                return self._record_attempt(job, spec, plan_layout(spec, available))
            except NoLayout as exc:
                waiting = exc.reason
        if (job.state_reason, job.state_message) != (WAITING_FOR_RANKS, waiting):
            self._wait_for_ranks(job, waiting)
        return None  # planned again when ranks are freed, or at the resync

    def _record_attempt(self, job: Job, spec: JobSpec, plan: LayoutPlan) -> Requeue:
        with self.db.session() as session:
            current = session.get(Job, job.name)
            if (current.state, current.cancel_requested, len(current.attempts)) != (
                    job.state, False, len(job.attempts)):
                return 0  # changed while we looked: look again
            number = len(current.attempts) + 1
            start_step = current.checkpoint_step  # the trainer resumes from the newest valid one it finds
            current.attempts.append(Attempt(
                job_name=job.name, number=number, state=AttemptState.PENDING, tp=plan.tp, pp=plan.pp,
                dp=plan.dp, world_size=plan.world_size, start_step=start_step, launch_info={}))
            p = spec.parallelism
            reshaped = (plan.tp, plan.pp, plan.dp) != (p.tp, p.pp, p.dp)
            message = (f"attempt {number}: tp={plan.tp} pp={plan.pp} dp={plan.dp}, {plan.world_size} ranks, "
                       f"from step {start_step}")
            if start_step:
                message += " (the newest committed checkpoint)"
            if reshaped:
                message += f"; {plan.reason}"
            transition(session, current, JobState.LAUNCHING, "AttemptCreated", message, attempt=number)
            if reshaped:
                record_event(session, current, "Planned", "Reshaped", plan.reason, attempt=number)
        return 0  # launch it now

    def _ranks_held_by_other_jobs(self, name: str) -> int:
        """Ranks of other jobs' attempts that have not ended: an attempt ends only once its ranks are gone."""
        with self.db.read() as session:
            held = session.scalar(select(func.coalesce(func.sum(Attempt.world_size), 0)).where(
                Attempt.job_name != name, Attempt.state.in_([AttemptState.PENDING, AttemptState.RUNNING])))
        return int(held)

    def _wait_for_ranks(self, job: Job, reason: str) -> None:
        """The job stays where it is (QUEUED or RESTARTING) and says why; later passes plan it again."""
        now = utcnow()
        last = job.current_attempt
        with self.db.session() as session:
            changed = session.execute(
                update(Job).where(Job.name == job.name, Job.state == job.state, Job.cancel_requested.is_(False))
                .values(state_reason=WAITING_FOR_RANKS, state_message=reason, update_time=now)).rowcount
            if changed:
                session.add(Event(job_name=job.name, attempt=last.number if last else None, type="Waiting",
                                  reason=WAITING_FOR_RANKS, message=reason, create_time=now))

    def _launch(self, job: Job, attempt: Attempt) -> Requeue:
        ref = AttemptRef(job.name, attempt.number, {})
        request = LaunchRequest(
            job=job.name, job_uid=job.uid, attempt=attempt.number,
            spec=spec_at_layout(self._spec(job), attempt.tp, attempt.pp, attempt.dp),
            tp=attempt.tp, pp=attempt.pp, dp=attempt.dp, start_step=attempt.start_step,
            job_token=job_token(self.credential_key, job.uid, attempt.number), server_address=self.server_address)
        try:
            info = self.launcher.launch(request)
        except Exception as exc:  # a launch that cannot happen is the attempt's failure, not the loop's
            log.exception("launching %s attempt %d failed", job.name, attempt.number)
            # Whatever half-started is killed: no grace for a gang that never ran.
            return self._fail(job, attempt, ref, "LaunchFailed", str(exc), grace=0.0)
        with self.db.session() as session:
            current = session.get(Job, job.name)
            row = current.current_attempt
            if row.number != attempt.number or row.launch_info or AttemptState(row.state).terminal:
                return 0
            row.launch_info = info
            record_event(session, current, "Launched", "RanksStarted",
                         f"started {row.world_size} ranks of attempt {row.number}", attempt=row.number)
        return 0  # see them run

    # -- watching an attempt -----------------------------------------------------------------------------

    def _observe(self, job: Job, attempt: Attempt) -> Requeue:
        ref = AttemptRef(job.name, attempt.number, dict(attempt.launch_info))
        status = self.launcher.status(ref)
        state = JobState(job.state)
        if status.phase is Phase.PENDING:
            return self.settings.interval_seconds
        if status.phase is Phase.FAILED:
            # Preempted ranks leave by themselves once they have checkpointed: they get the full grace. The
            # rest of a crashed gang is killed (it only hangs in collectives).
            grace = (self.settings.stop_grace_seconds if status.reason == PREEMPTED
                     else self.settings.failed_stop_grace_seconds)
            return self._fail(job, attempt, ref, status.reason, status.message, grace, status.retryable)
        if status.phase is Phase.RUNNING and state is JobState.RUNNING:
            hang = self._hang(job, attempt)
            if hang:
                return self._fail(job, attempt, ref, HUNG, hang, self.settings.failed_stop_grace_seconds)
            return self.settings.interval_seconds  # nothing new: no write transaction
        freed = False
        with self.db.session() as session:
            current = session.get(Job, job.name)
            row = current.current_attempt
            if row.number != attempt.number or current.state != job.state or current.cancel_requested:
                return 0  # changed while we looked
            if status.phase is Phase.RUNNING:
                if row.state == AttemptState.PENDING:
                    row.state = AttemptState.RUNNING
                    row.start_time = utcnow()
                if state is JobState.LAUNCHING:
                    transition(session, current, JobState.RUNNING, "RanksRunning",
                               f"all {row.world_size} ranks of attempt {row.number} are running", attempt=row.number)
            else:  # SUCCEEDED: every rank exited 0, none is left
                _end_attempt(row, AttemptState.SUCCEEDED, "all ranks exited 0")
                current.current_step = max(current.current_step, current.total_steps)
                transition(session, current, JobState.SUCCEEDED, "Completed", f"trained {current.total_steps} steps",
                           attempt=row.number)
                freed = True
        if freed:
            self._wake_waiting()
            return None
        return self.settings.interval_seconds

    def _hang(self, job: Job, attempt: Attempt) -> str:
        """A running attempt with a rank silent for the job's hang timeout is hung: names the silent ranks."""
        timeout = self._spec(job).restart_policy.hang_timeout_seconds
        if time.monotonic() - self.started_at < timeout:
            return ""
        with self.db.read() as session:
            beats = {rank: (last, step) for rank, last, step in session.execute(
                select(RankStatus.rank, RankStatus.last_heartbeat, RankStatus.step)
                .where(RankStatus.job_name == job.name, RankStatus.attempt == attempt.number))}
        return hang_message(attempt, beats, job.total_steps, timeout,
                            max(timeout, self.settings.hang_start_end_grace_seconds))

    # -- stopping an attempt -----------------------------------------------------------------------------

    def _cancel(self, job: Job, attempt: Attempt | None) -> Requeue:
        if attempt is None or AttemptState(attempt.state).terminal:
            with self.db.session() as session:
                current = session.get(Job, job.name)
                if not JobState(current.state).terminal:
                    transition(session, current, JobState.CANCELLED, "CancelRequested", "cancelled by user",
                               attempt=attempt.number if attempt else None)
            return None
        ref = AttemptRef(job.name, attempt.number, dict(attempt.launch_info))
        grace = self.settings.stop_grace_seconds
        with self.db.session() as session:
            current = session.get(Job, job.name)
            row = current.current_attempt
            if row.number != attempt.number or row.stopping or AttemptState(row.state).terminal:
                return 0
            _begin_stop(session, current, row, AttemptState.CANCELLED, "cancelled by user", grace)
        self.launcher.stop(ref, grace)
        return 0  # see whether they are gone

    def _fail(self, job: Job, attempt: Attempt, ref: AttemptRef, reason: str, message: str, grace: float,
              retryable: bool = True) -> Requeue:
        """Records the failure's decision (a restart, or the job fails once its ranks are gone) and starts
        stopping the gang. The decision is durable before any rank is signalled: a hung gang, once killed,
        would otherwise read as an ordinary crash."""
        spec = self._spec(job)
        with self.db.session() as session:
            current = session.get(Job, job.name)
            row = current.current_attempt
            if (row.number != attempt.number or row.stopping or AttemptState(row.state).terminal
                    or current.state != job.state or current.cancel_requested):
                return 0  # changed while we looked
            decision = decide(current, spec, reason, message, retryable, self.settings.restart_backoff_seconds,
                              self.settings.restart_backoff_max_seconds)
            if decision.state is JobState.RESTARTING:
                setattr(current, decision.counter, getattr(current, decision.counter) + 1)
                current.next_attempt_time = utcnow() + timedelta(seconds=decision.backoff_seconds)
                transition(session, current, JobState.RESTARTING, reason, decision.message, attempt=row.number)
            else:  # FAILED once the ranks are gone (`_finish_stop`); the job says why meanwhile
                current.state_reason, current.state_message = reason, decision.message
                current.update_time = utcnow()
            _begin_stop(session, current, row, AttemptState.FAILED, message, grace)
        self.launcher.stop(ref, grace)
        return 0  # see whether they are gone

    def _finish_stop(self, job: Job, attempt: Attempt) -> Requeue:
        """Ends a stopping attempt once its ranks are gone; kills what is left after the grace."""
        ref = AttemptRef(job.name, attempt.number, dict(attempt.launch_info))
        if not self.launcher.ranks_gone(ref):
            left = (attempt.stop_deadline - utcnow()).total_seconds()
            if left > 0:
                return min(self.settings.interval_seconds, left)
            self.launcher.stop(ref, 0)  # the grace is over: kill what is left
            return self.settings.interval_seconds
        with self.db.session() as session:
            current = session.get(Job, job.name)
            row = current.current_attempt
            if row.number != attempt.number or not row.stopping:
                return 0
            row.state = row.stop_outcome
            row.end_time = utcnow()
            state = JobState(current.state)
            if current.cancel_requested and not state.terminal:
                transition(session, current, JobState.CANCELLED, "CancelRequested", "cancelled by user",
                           attempt=row.number)
            elif state in (JobState.LAUNCHING, JobState.RUNNING):  # the failure `_fail` decided
                transition(session, current, JobState.FAILED, current.state_reason, current.state_message,
                           attempt=row.number)
            # RESTARTING: the next attempt starts when its backoff ends, now that no rank of this one runs.
        self._wake_waiting()
        return 0

    # -- helpers -----------------------------------------------------------------------------------------

    def _spec(self, job: Job) -> JobSpec:
        """The job's parsed spec (validated when the job was created; parsed once per job here)."""
        with self._specs_lock:
            spec = self._specs.get(job.uid)
            if spec is not None:
                self._specs.move_to_end(job.uid)
                return spec
        spec = parse_spec(job.spec)
        with self._specs_lock:
            self._specs[job.uid] = spec
            while len(self._specs) > SPECS_CACHED:
                self._specs.popitem(last=False)
        return spec


def _begin_stop(session, job: Job, attempt: Attempt, outcome: AttemptState, end_reason: str, grace: float) -> None:
    """Records that the attempt's ranks are being stopped, and what the attempt becomes once they are gone."""
    now = utcnow()
    attempt.stop_deadline = now + timedelta(seconds=grace)
    attempt.stop_outcome = outcome
    attempt.end_reason = end_reason
    record_event(session, job, "Stopping", "StoppingRanks",
                 f"attempt {attempt.number}: its ranks were told to stop ({grace:g} s grace): {end_reason}",
                 attempt=attempt.number)


def _end_attempt(attempt: Attempt, state: AttemptState, reason: str) -> None:
    attempt.state = state
    attempt.end_time = utcnow()
    attempt.end_reason = reason
