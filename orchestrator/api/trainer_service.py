"""roundhouse.v1.TrainerService: what ranks call. Ranks never touch the database; this is their only way in.

Each call must carry the credential of the attempt it names, for a rank within that attempt's world size,
and is refused once that attempt has ended (FAILED_PRECONDITION: its ranks are gone, so nothing more can
come from them). These checks read, and never write: a refused call takes no write lock. Every answer tells
a rank whether to stop: a rank of an attempt that is no longer current (or of a cancelled job) is told to exit.

Heartbeats go to memory (orchestrator/heartbeats.py), which writes them to the database as periodic
summaries. Checkpoint reports are facts about files on disk, so they are recorded whichever attempt sends
them while it has not ended (a rank stopping on SIGTERM commits one last checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
from sqlalchemy import delete, exists, func, select

from orchestrator.api.errors import abort_field, abort_invalid
from orchestrator.auth import bearer_token
from orchestrator.heartbeats import Heartbeats
from orchestrator.lifecycle import record_event
from orchestrator.service.access import rank_may_report
from orchestrator.service.jobs import job_id
from contract.metrics import MAX_PARAMETER_NAME, MAX_SIGMA_PARAMETERS
from contract.spec import FieldViolation
from orchestrator.store import AttemptState, Checkpoint, Database, Event, Job, JobState, Metric, utcnow
from roundhouse.v1 import trainer_service_pb2, trainer_service_pb2_grpc

_EVENTS = trainer_service_pb2.CheckpointEvent
MAX_PHASE_LENGTH = 64  # a rank's phase is a few words; a longer one is cut, not stored whole
UNAUTHENTICATED_MESSAGE = "the credential does not match this job and attempt"


class TrainerService(trainer_service_pb2_grpc.TrainerServiceServicer):
    def __init__(self, db: Database, credential_key: bytes, on_checkpoint_commit: Callable[[], None] = lambda: None,
                 heartbeats: Heartbeats | None = None):
        self.db = db
        self.credential_key = credential_key
        # Called once for each commit recorded (not for a retried report): the checkpoint-commit counter.
        self.on_checkpoint_commit = on_checkpoint_commit
        self.heartbeats = heartbeats or Heartbeats(db)

    def Heartbeat(self, request, context):
        with self.db.read() as session:
            job = self._admitted_job(session, request, context)
            stop, reason = _should_stop(job, request.attempt)
            name = job.name
        self.heartbeats.record(name, request.attempt, request.rank, request.step, request.phase[:MAX_PHASE_LENGTH])
        return trainer_service_pb2.HeartbeatResponse(stop=stop, stop_reason=reason)

    def ReportMetrics(self, request, context):
        with self.db.read() as session:
            self._admitted_job(session, request, context)
        violations = _metric_report_violations(request)
        if violations:  # before anything is written
            abort_invalid(context, violations)
        with self.db.session() as session:
            job = self._admitted_job(session, request, context)
            stop, reason = _should_stop(job, request.attempt)
            if not stop:
                for point in request.points:
                    session.add(Metric(
                        job_name=job.name, attempt=request.attempt, rank=request.rank, step=point.step,
                        loss=point.loss if point.HasField("loss") else None,
                        val_loss=point.val_loss if point.HasField("val_loss") else None,
                        tokens_per_second=point.tokens_per_second, memory_bytes=point.memory_bytes,
                        learning_rate=point.learning_rate,
                        time=point.time.ToDatetime() if point.HasField("time") else utcnow(),
                        sigma_max=_stored_sigma_max(point.sigma_max)))
                trained = [p for p in request.points if p.HasField("loss")]
                if trained:
                    newest = max(trained, key=lambda p: p.step)
                    job.current_step = newest.step
                    job.last_loss = newest.loss
                    job.tokens_per_second = newest.tokens_per_second
                    job.update_time = utcnow()
        return trainer_service_pb2.ReportMetricsResponse(stop=stop, stop_reason=reason)

    def ReportCheckpoint(self, request, context):
        violations = _checkpoint_report_violations(request)
        with self.db.read() as session:
            self._admitted_job(session, request, context)
        if violations:
            abort_invalid(context, violations)
        committed = False
        with self.db.session() as session:
            # Locked (PostgreSQL; SQLite writers queue anyway): one job's reports apply one at a time, so
            # checkpoint_step is always the newest row's step. Checked again: the attempt may have ended since.
            job = self._admitted_job(session, request, context, lock=True)
            if request.event == _EVENTS.CHECKPOINT_EVENT_COMMITTED:
                committed = _record_commit(session, job, request)
            elif request.event == _EVENTS.CHECKPOINT_EVENT_RESTORED:
                _record_restore(session, job, request)
            elif request.event == _EVENTS.CHECKPOINT_EVENT_REJECTED:
                _forget_checkpoint(session, job, request.step)
                _record_event_once(session, job, "CheckpointCorrupt", request.attempt,
                                   f"checkpoint at step {request.step} failed its checks and was skipped"
                                   + (f": {request.message}" if request.message else ""))
            else:  # REMOVED by the retention policy: nothing to tell a user
                _forget_checkpoint(session, job, request.step)
            stop, reason = _should_stop(job, request.attempt)
        if committed:
            self.on_checkpoint_commit()
        return trainer_service_pb2.ReportCheckpointResponse(stop=stop, stop_reason=reason)

    def _admitted_job(self, session, request, context, lock: bool = False) -> Job:
        """The job the call names, if the call may report for it; else the call ends here. First (before any
        database access) a credential must be there at all; then it must be this attempt's, the attempt must
        not have ended and the rank must be one of its ranks."""
        token = bearer_token(context.invocation_metadata())
        if token is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        found = job_id(request.job)
        job = session.get(Job, found, with_for_update=lock) if found else None
        if not rank_may_report(self.credential_key, job, request.attempt, token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        attempt = next((a for a in job.attempts if a.number == request.attempt), None)
        if attempt is None or AttemptState(attempt.state).terminal:
            ended = f"has ended ({attempt.state})" if attempt is not None else "does not exist"
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"attempt {request.attempt} of {job.resource_name} {ended}: its reports are refused")
        if not 0 <= request.rank < attempt.world_size:
            abort_field(context, "rank", f"must be in [0, {attempt.world_size}) for attempt {attempt.number}")
        return job


def _metric_report_violations(request) -> list[FieldViolation]:
    """A point's top singular values are bounded (contract.metrics), so that every point stays small."""
    out = []
    for index, point in enumerate(request.points):
        where = f"points[{index}].sigma_max"
        if len(point.sigma_max) > MAX_SIGMA_PARAMETERS:
            out.append(FieldViolation(where, f"at most {MAX_SIGMA_PARAMETERS} parameters per point, got "
                                             f"{len(point.sigma_max)}"))
        if any(not name or len(name) > MAX_PARAMETER_NAME for name in point.sigma_max):
            out.append(FieldViolation(where, f"a parameter name must have 1 to {MAX_PARAMETER_NAME} characters"))
    return out


def _stored_sigma_max(values) -> dict[str, float | None] | None:
    """The point's σ_max map as stored: None when it carries none; a value that is not finite (diverged
    weights) as None, which JSON can hold on every database."""
    if not values:
        return None
    return {name: value if math.isfinite(value) else None for name, value in values.items()}


def _checkpoint_report_violations(request) -> list[FieldViolation]:
    out = []
    if request.event not in _EVENTS.values() or request.event == _EVENTS.CHECKPOINT_EVENT_UNSPECIFIED:
        out.append(FieldViolation("event", "required: COMMITTED, RESTORED, REJECTED or REMOVED"))
    if request.step < 0:
        out.append(FieldViolation("step", "must not be negative"))
    if request.size_bytes < 0:
        out.append(FieldViolation("size_bytes", "must not be negative"))
    if request.event in (_EVENTS.CHECKPOINT_EVENT_COMMITTED, _EVENTS.CHECKPOINT_EVENT_RESTORED):
        for name in ("tp", "pp", "dp"):
            if getattr(request.layout, name) < 1:
                out.append(FieldViolation(f"layout.{name}", "required: the layout the checkpoint was written at"))
    return out


def _record_commit(session, job: Job, request) -> bool:
    """Upserts the checkpoint's row: a report sent twice (a retry) changes nothing. True if this report is
    a commit not recorded before (a new step, or a step written again by a later attempt)."""
    row = session.scalar(select(Checkpoint).where(Checkpoint.job_name == job.name, Checkpoint.step == request.step))
    if row is not None and row.attempt > request.attempt:
        return False  # a newer attempt wrote this step again; what is on disk is its
    new = row is None or row.attempt < request.attempt  # else a retry of a report already recorded
    if row is None:
        row = Checkpoint(job_name=job.name, step=request.step, commit_time=utcnow())
        session.add(row)
    row.attempt = request.attempt
    row.tp, row.pp, row.dp = request.layout.tp, request.layout.pp, request.layout.dp
    row.path = request.path
    row.size_bytes = request.size_bytes
    if request.step > job.checkpoint_step:
        job.checkpoint_step = request.step
        job.update_time = utcnow()
    return new


def _record_restore(session, job: Job, request) -> None:
    """The attempt resumed from this checkpoint: that is its start step, and worth an event."""
    layout = request.layout
    written = f"tp={layout.tp} pp={layout.pp} dp={layout.dp}"
    attempt = next((a for a in job.attempts if a.number == request.attempt), None)
    if attempt is None:
        how = f"written at {written}"
    else:
        attempt.start_step = request.step
        loaded = f"tp={attempt.tp} pp={attempt.pp} dp={attempt.dp}"
        how = f"written at {written}, reshaped to {loaded}" if loaded != written else f"written and loaded at {written}"
    _record_event_once(session, job, "CheckpointRestored", request.attempt,
                       f"attempt {request.attempt} resumed from the checkpoint at step {request.step}, {how}")


def _forget_checkpoint(session, job: Job, step: int) -> None:
    """Deletes the step's row (if any); checkpoint_step becomes the newest remaining one."""
    session.execute(delete(Checkpoint).where(Checkpoint.job_name == job.name, Checkpoint.step == step))
    newest = session.scalar(select(func.coalesce(func.max(Checkpoint.step), 0)).where(Checkpoint.job_name == job.name))
    if newest != job.checkpoint_step:
        job.checkpoint_step = newest
        job.update_time = utcnow()


def _record_event_once(session, job: Job, reason: str, attempt: int, message: str) -> None:
    """A retried report must not log the same event twice."""
    seen = session.scalar(select(exists().where(Event.job_name == job.name, Event.reason == reason,
                                                Event.attempt == attempt, Event.message == message)))
    if not seen:
        record_event(session, job, "Checkpoint", reason, message, attempt=attempt)


def _should_stop(job: Job, attempt: int) -> tuple[bool, str]:
    if job.cancel_requested:
        return True, "the job was cancelled"
    if JobState(job.state).terminal:
        return True, f"the job has ended ({job.state})"
    current = job.current_attempt
    if current is None or current.number != attempt:
        return True, f"attempt {attempt} is not the job's current attempt"
    return False, ""

