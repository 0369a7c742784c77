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
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, exists, func, or_, select, tuple_

from contract.spec import JobSpec, parse_spec
from orchestrator.auth import job_token
from orchestrator.controller.failure_policy import HUNG, decide, hang_message
from orchestrator.controller.runtime import ControllerRuntime, Requeue
from orchestrator.controller.waiting_writer import WAITING_FOR_RANKS, WaitingNote, WaitingWriter
from orchestrator.heartbeats import Heartbeats
from orchestrator.launcher import PREEMPTED, AttemptRef, Launcher, LaunchRequest, Phase, RankTls
from orchestrator.lifecycle import record_event, transition
from orchestrator.planner import LayoutPlan, NoLayout, fewest_ranks, plan_layout, spec_at_layout
from orchestrator.store import Attempt, AttemptState, Database, Job, JobState, utcnow

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.LAUNCHING, JobState.RUNNING, JobState.RESTARTING)
# Parsed specs kept, by job uid (a spec never changes): enough for the jobs a controller looks at again and again
# (running ones, every 0.5 s); a job waiting for ranks needs its spec about once. A parsed spec is some
# kilobytes of objects: 4,096 of them were most of the server's memory growth under load (docs/benchmarks.md).
SPECS_CACHED = 512

# What a pass reads of a job and of its current attempt: plain columns, not ORM objects, in statements built
# once (a pass over a waiting job is the hot path when thousands wait).
_JOBS, _ATTEMPTS = Job.__table__, Attempt.__table__
_JOB_FIELDS = ("name", "uid", "spec", "state", "state_reason", "state_message", "cancel_requested",
               "next_attempt_time", "total_steps")
_ATTEMPT_FIELDS = ("number", "state", "tp", "pp", "dp", "world_size", "start_step", "launch_info", "create_time",
                   "start_time", "stop_deadline", "stop_outcome")
_NEWER = _ATTEMPTS.alias("newer")
# One statement, one round trip: the job's row and its newest attempt's (NULLs when it has none).
_READ_JOB = select(*(_JOBS.c[f] for f in _JOB_FIELDS),
                   *(_ATTEMPTS.c[f].label(f"attempt_{f}") for f in _ATTEMPT_FIELDS)) \
    .select_from(_JOBS.outerjoin(_ATTEMPTS, (_ATTEMPTS.c.job_name == _JOBS.c.name) & (
        _ATTEMPTS.c.number == select(func.max(_NEWER.c.number)).where(_NEWER.c.job_name == _JOBS.c.name)
        .correlate(_JOBS).scalar_subquery()))) \
    .where(_JOBS.c.name == bindparam("name"))
# Ranks held by attempts that have not ended (an attempt ends only once its ranks are gone).
_UNFINISHED_ATTEMPT = _ATTEMPTS.c.state.in_([AttemptState.PENDING.value, AttemptState.RUNNING.value])
_RANKS_HELD = select(func.coalesce(func.sum(_ATTEMPTS.c.world_size), 0)).where(_UNFINISHED_ATTEMPT)
# The jobs an admission may start, oldest first: queued ones (they hold no ranks), and restarting ones whose
# backoff is over and whose last attempt has ended (its ranks are gone). Not by their "waiting" note: that is
# group-committed a moment after the pass that made it, and a job whose note is not in yet still waits.
# Read a page at a time, after the last row of the page before (keyset), so a pass reads only as far down the
# line as the free ranks go, and holds one page in memory however many jobs wait.
_ADMISSIBLE = select(_JOBS.c.name, _JOBS.c.uid, _JOBS.c.state_reason, _JOBS.c.create_time).where(
    _JOBS.c.cancel_requested.is_(False),
    or_(_JOBS.c.state == JobState.QUEUED.value,
        and_(_JOBS.c.state == JobState.RESTARTING.value,
             or_(_JOBS.c.next_attempt_time.is_(None), _JOBS.c.next_attempt_time <= bindparam("now")),
             ~exists().where(_ATTEMPTS.c.job_name == _JOBS.c.name, _UNFINISHED_ATTEMPT)))) \
    .order_by(_JOBS.c.create_time, _JOBS.c.name)
ADMISSION_PAGE = 200  # admissible jobs read at a time
_ADMISSIBLE_FIRST = _ADMISSIBLE.limit(bindparam("page"))
_ADMISSIBLE_AFTER = _ADMISSIBLE.where(
    tuple_(_JOBS.c.create_time, _JOBS.c.name) > tuple_(bindparam("after_time", type_=_JOBS.c.create_time.type),
                                                          bindparam("after_name", type_=_JOBS.c.name.type))) \
    .limit(bindparam("page"))
_SPECS = select(_JOBS.c.uid, _JOBS.c.spec).where(_JOBS.c.uid.in_(bindparam("uids", expanding=True)))
# The fewest ranks of jobs admission passes have looked at, by uid: enough for every job a pass reads when
# none fits the free ranks, so those passes read no spec twice (a float each, where a parsed spec is kilobytes).
FEWEST_CACHED = 16_384


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


@dataclass(frozen=True)
class AttemptView:
    number: int
    state: str
    tp: int
    pp: int
    dp: int
    world_size: int
    start_step: int
    launch_info: dict
    create_time: datetime
    start_time: datetime | None
    stop_deadline: datetime | None
    stop_outcome: str | None

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None and not AttemptState(self.state).terminal


@dataclass(frozen=True)
class JobView:
    name: str
    uid: str
    spec: dict
    state: str
    state_reason: str
    state_message: str
    cancel_requested: bool
    next_attempt_time: datetime | None
    total_steps: int
    attempt: AttemptView | None  # the current (newest) attempt; attempts are numbered from 1

    @property
    def attempts(self) -> int:
        return self.attempt.number if self.attempt else 0


class JobController:
    def __init__(self, db: Database, launcher: Launcher, credential_key: bytes, server_address: str,
                 settings: ReconcilerSettings = ReconcilerSettings(), workers: int = 4,
                 heartbeats: Heartbeats | None = None, rank_tls: RankTls | None = None):
        self.db = db
        # The ranks' heartbeats: the TrainerService's (in memory, then summarized), or the database's alone.
        self.heartbeats = heartbeats or Heartbeats(db)
        # What ranks need for the control plane's TLS (None: plaintext).
        self.rank_tls = rank_tls
        self.launcher = launcher
        self.credential_key = credential_key
        self.server_address = server_address
        self.settings = settings
        self.runtime = ControllerRuntime("jobs", self.reconcile, self._resync_keys, workers,
                                         settings.resync_seconds)
        self.waiting_writer = WaitingWriter(db)
        # The launcher's capacity is shared by every job: planning and recording an attempt is one critical
        # section, or two workers would hand out the same free ranks.
        self._admission = threading.Lock()
        # The ranks held by unfinished attempts, as last read (None: read it again). Only this controller
        # changes that sum, always under the admission lock: a new attempt adds to it; an attempt that ended
        # (after its commit) voids it. So it can be too high for a moment, never too low.
        self._held: int | None = None
        # Admission's memory, under the admission lock (see `_wake_admissible`): the fewest ranks a job can start
        # with, by uid (a bounded cache: a spec never changes), and the jobs an admission pass woke whose own
        # pass has not come yet (that pass takes the name out, whatever it finds).
        self._fewest: OrderedDict[str, float] = OrderedDict()
        self._woken: set[str] = set()
        self._specs: OrderedDict[str, JobSpec] = OrderedDict()
        self._specs_lock = threading.Lock()
        # Heartbeats cannot arrive while no control plane runs, so hangs are judged only once this one has
        # been up for a job's hang timeout. A fact about this process, not job state (monotonic seconds).
        self.started_at = time.monotonic()

    # -- wiring ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.launcher.subscribe(self.runtime.notify)
        self.waiting_writer.start()
        self.runtime.start()

    def stop(self) -> None:
        self.runtime.stop()
        self.waiting_writer.close()

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

    def _resync_keys(self) -> list[str]:
        """What the periodic resync (and the one at start) queues: every unfinished job except those waiting for
        ranks, for which one admission pass wakes the ones that can start now. A pass over each waiting job
        would only find again that it cannot, and with thousands waiting those passes, every resync, held up
        every other job. (A waiting job moves otherwise only when cancelled: it is queued then, and kept here.)"""
        with self.db.read_connection() as conn:
            names = list(conn.execute(select(_JOBS.c.name).where(
                _JOBS.c.state.in_([state.value for state in ACTIVE_STATES]),
                ~and_(_JOBS.c.state.in_([JobState.QUEUED.value, JobState.RESTARTING.value]),
                      _JOBS.c.state_reason == WAITING_FOR_RANKS, _JOBS.c.cancel_requested.is_(False)))
                .order_by(_JOBS.c.create_time, _JOBS.c.name)).scalars())
        try:
            self._wake_admissible()  # queues those it wakes, ahead of the rest
        except Exception:  # the rest are still queued
            log.exception("the resync's admission pass failed")
        return names

    # -- one pass ----------------------------------------------------------------------------------------

    def reconcile(self, name: str) -> Requeue:
        """One pass over one job; returns when to look again (see runtime.Requeue)."""
        woken = self._take_wake(name)
        job = self._read(name)
        if job is None:
            return None
        attempt = job.attempt
        if attempt is not None and attempt.stopping:
            return self._finish_stop(job, attempt)
        state = JobState(job.state)
        if state.terminal:
            return None
        if job.cancel_requested:
            return self._cancel(job, attempt, woken)
        if state is JobState.QUEUED:
            return self._admit(job, woken)
        if state is JobState.RESTARTING:
            until_due = (job.next_attempt_time - utcnow()).total_seconds() if job.next_attempt_time else 0
            return until_due if until_due > 0 else self._admit(job, woken)
        if not attempt.launch_info:
            return self._launch(job, attempt)
        return self._observe(job, attempt)

    def _read(self, name: str) -> JobView | None:
        with self.db.read_connection() as conn:
            row = conn.execute(_READ_JOB, {"name": name}).one_or_none()
        if row is None:
            return None
        attempt = None
        if row.attempt_number is not None:
            attempt = AttemptView(**{f: getattr(row, f"attempt_{f}") for f in _ATTEMPT_FIELDS})
        return JobView(**{f: getattr(row, f) for f in _JOB_FIELDS}, attempt=attempt)

    # -- starting an attempt -----------------------------------------------------------------------------

    def _take_wake(self, name: str) -> bool:
        """Whether an admission pass woke job `name` since its last pass; forgets it, so every name woken leaves
        with the pass its wake queued, whatever that pass finds. Every pass asks, so the usual answer (no) is read
        without the admission lock, which an admission pass may hold a while: a wake added just after is
        followed by the pass it queues, which takes it."""
        if name not in self._woken:
            return False
        with self._admission:
            if name not in self._woken:
                return False
            self._woken.remove(name)
            return True

    def _admit(self, job: JobView, woken: bool) -> Requeue:
        """Plans and records a new attempt (the launch follows in the next pass, so a crash in between is
        safe). With too few ranks for any valid layout, records why the job waits. `woken`: an admission pass
        woke this job for ranks it found free; if they are gone by now (a new job came first), that pass is made
        again below, so the ranks left go to the next job that fits them."""
        spec = self._spec(job)
        with self._admission:
            available = self.launcher.capacity()  # outside any transaction: a launcher may ask a cluster
            if available is not None:
                # A job being admitted holds no ranks itself (its previous attempt, if any, has ended).
                available = max(0, available - self._ranks_held())
            try:
                return self._record_attempt(job, spec, plan_layout(spec, available))
            except NoLayout as exc:
                waiting = exc.reason
        if (job.state_reason, job.state_message) != (WAITING_FOR_RANKS, waiting):
            self._wait_for_ranks(job, waiting)
        if woken:
            self._wake_admissible_or_resync()
        return None  # woken again when ranks are freed, or at the resync

    def _record_attempt(self, job: JobView, spec: JobSpec, plan: LayoutPlan) -> Requeue:
        with self.db.session() as session:
            current = session.get(Job, job.name)
            if (current.state, current.cancel_requested, len(current.attempts)) != (job.state, False, job.attempts):
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
            if plan.offload:
                record_event(session, current, "Planned", "OptimizerStateOffloaded", plan.offload, attempt=number)
        if self._held is not None:
            self._held += plan.world_size
        return 0  # launch it now

    def _ranks_held(self) -> int:  # admission lock held
        if self._held is None:
            with self.db.read_connection() as conn:
                self._held = int(conn.execute(_RANKS_HELD).scalar())
        return self._held

    def _ranks_freed(self) -> None:
        """An attempt ended (its ranks are gone): wake the waiting jobs that can use them."""
        with self._admission:
            self._held = None
        self._wake_admissible_or_resync()

    def _wake_admissible_or_resync(self) -> None:
        """`_wake_admissible`, or, if it fails (a database hiccup), a resync: what decided the wake is already
        committed, so a pass retried later would not wake anyone, and the waiting jobs must not wait for the
        periodic resync."""
        try:
            self._wake_admissible()
        except Exception:
            log.exception("waking the jobs waiting for ranks failed; every unfinished job is looked at instead")
            self.runtime.resync()

    def _wake_admissible(self) -> list[str]:
        """An admission pass: goes through the admissible jobs oldest first and queues each one that can start
        with the ranks still free, counting what the planner would give it as taken, until none are left; a
        job that cannot start with what is left is passed over (a smaller, younger one may). Returns whom it
        woke.

        Only those jobs get a pass: waking every waiting job whenever an attempt ended cost a pass per waiting
        job per ended attempt, and with hundreds waiting that delayed every other job by tens of seconds. The
        jobs' own passes admit them (under the admission lock, against the capacity as it is then), so this
        only chooses whom to wake; it is level-triggered (it reads the database each time; running it twice
        wakes the same jobs). It reads the jobs a page at a time and stops once no ranks are left: with
        thousands waiting, reading them all on every ended attempt made the server's memory grow with the
        queue (docs/benchmarks.md)."""
        wake: list[str] = []
        available: int | None = None
        after: dict | None = None  # the last row of the page before
        while True:
            with self.db.read_connection() as conn:
                params = {"now": utcnow(), "page": ADMISSION_PAGE}
                if after is None:
                    page = conn.execute(_ADMISSIBLE_FIRST, params).all()
                else:
                    page = conn.execute(_ADMISSIBLE_AFTER, {**params, **after}).all()
                unseen = [row.uid for row in page if row.uid not in self._fewest]
                specs = dict(conn.execute(_SPECS, {"uids": unseen}).all()) if unseen else {}
            fewest = {uid: self._fewest_ranks(uid, spec) for uid, spec in specs.items()}
            woken: list[str] = []
            with self._admission:
                for row in page:  # (a job dropped from the cache since `unseen` has its spec read here, once)
                    if row.uid not in fewest:
                        fewest[row.uid] = self._fewest.get(row.uid) or self._fewest_ranks(row.uid, None)
                    self._fewest[row.uid] = fewest[row.uid]
                    self._fewest.move_to_end(row.uid)
                while len(self._fewest) > FEWEST_CACHED:
                    self._fewest.popitem(last=False)
                if after is None:  # the free ranks, once a pass: its later pages go on from what it counted
                    available = self.launcher.capacity()
                    if available is not None:
                        available -= self._ranks_held()
                if available is None:  # no limit: nothing waits for ranks, but a note from before may linger
                    woken = [row.name for row in page if row.state_reason == WAITING_FOR_RANKS]
                else:
                    for row in page:
                        if available <= 0:
                            break
                        if fewest[row.uid] > available:
                            continue
                        plan = plan_layout(self._parsed(row.uid, specs.get(row.uid)), available)
                        available -= plan.world_size
                        woken.append(row.name)
                self._woken.update(woken)
            self.runtime.queue.add_all(woken)
            wake += woken
            if len(page) < ADMISSION_PAGE or (available is not None and available <= 0):
                return wake
            after = {"after_time": page[-1].create_time, "after_name": page[-1].name}

    def _fewest_ranks(self, uid: str, spec: dict | None) -> float:
        """The fewest ranks job `uid` can start with; infinite for a spec that no longer parses (one bad row
        must not stop every admission: that job's own passes fail and say why, as before)."""
        try:
            return fewest_ranks(self._parsed(uid, spec))
        except Exception:
            log.exception("job uid %s: its spec cannot be planned; admission passes over it", uid)
            return math.inf

    def _wait_for_ranks(self, job: JobView, reason: str) -> None:
        """The job stays where it is (QUEUED or RESTARTING) and says why; later passes plan it again."""
        self.waiting_writer.note(WaitingNote(job.name, job.state, job.attempt.number if job.attempt else None,
                                             reason, utcnow()))

    def _launch(self, job: JobView, attempt: AttemptView) -> Requeue:
        ref = AttemptRef(job.name, attempt.number, {})
        request = LaunchRequest(
            job=job.name, job_uid=job.uid, attempt=attempt.number,
            spec=spec_at_layout(self._spec(job), attempt.tp, attempt.pp, attempt.dp),
            tp=attempt.tp, pp=attempt.pp, dp=attempt.dp, start_step=attempt.start_step,
            job_token=job_token(self.credential_key, job.uid, attempt.number), server_address=self.server_address,
            tls=self.rank_tls)
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

    def _observe(self, job: JobView, attempt: AttemptView) -> Requeue:
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
                # The step stays what the ranks reported: an exit code says nothing of how far they trained.
                transition(session, current, JobState.SUCCEEDED, "Completed",
                           f"trained {current.current_step} of {current.total_steps} steps", attempt=row.number)
                freed = True
        if freed:
            self._ranks_freed()
            return None
        return self.settings.interval_seconds

    def _hang(self, job: JobView, attempt: AttemptView) -> str:
        """A running attempt with a rank silent for the job's hang timeout is hung: names the silent ranks."""
        timeout = self._spec(job).restart_policy.hang_timeout_seconds
        if time.monotonic() - self.started_at < timeout:
            return ""
        beats = self.heartbeats.beats(job.name, attempt.number)
        return hang_message(attempt, beats, job.total_steps, timeout,
                            max(timeout, self.settings.hang_start_end_grace_seconds))

    # -- stopping an attempt -----------------------------------------------------------------------------

    def _cancel(self, job: JobView, attempt: AttemptView | None, woken: bool) -> Requeue:
        if attempt is None or AttemptState(attempt.state).terminal:
            with self.db.session() as session:
                current = session.get(Job, job.name)
                if not JobState(current.state).terminal:
                    transition(session, current, JobState.CANCELLED, "CancelRequested", "cancelled by user",
                               attempt=attempt.number if attempt else None)
            if woken:  # an admission pass counted ranks for it: they go to the next job that fits them
                self._wake_admissible_or_resync()
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

    def _fail(self, job: JobView, attempt: AttemptView, ref: AttemptRef, reason: str, message: str, grace: float,
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

    def _finish_stop(self, job: JobView, attempt: AttemptView) -> Requeue:
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
        self._ranks_freed()
        return 0

    # -- helpers -----------------------------------------------------------------------------------------

    def _spec(self, job: JobView) -> JobSpec:
        """The job's parsed spec (validated when the job was created; parsed once per job here)."""
        return self._parsed(job.uid, job.spec)

    def _parsed(self, uid: str, spec: dict | None) -> JobSpec:
        """The parsed spec of job `uid` (its spec as stored; None: read it if it is not cached)."""
        with self._specs_lock:
            parsed = self._specs.get(uid)
            if parsed is not None:
                self._specs.move_to_end(uid)
                return parsed
        parsed = parse_spec(spec if spec is not None else self._read_spec(uid))
        with self._specs_lock:
            self._specs[uid] = parsed
            while len(self._specs) > SPECS_CACHED:
                self._specs.popitem(last=False)
        return parsed

    def _read_spec(self, uid: str) -> dict:
        with self.db.read_connection() as conn:
            return conn.execute(select(_JOBS.c.spec).where(_JOBS.c.uid == uid)).scalar_one()


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
