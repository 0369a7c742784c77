"""roundhouse.v1.JobService: what users call. Handlers validate at the edge, write durable intent, and
wake the reconciler; they never launch or stop ranks themselves."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime

import grpc
from sqlalchemy import and_, exists, or_, select

from orchestrator.api import convert
from orchestrator.api.errors import abort_field, abort_invalid
from orchestrator.auth import Principal, UserTokens, bearer_token
from orchestrator.launcher import AttemptRef, Launcher
from orchestrator.lifecycle import record_event
from contract.spec import FieldViolation, JobSpec, SpecError, spec_from_proto, spec_to_proto
from orchestrator.store import (AttemptState, Checkpoint, Database, Event, Job, JobLabel, JobState, Metric, NameTaken,
                                NewJob, utcnow)
from roundhouse.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
WATCH_POLL_SECONDS = 0.25
WATCH_BATCH = 1000


class JobService(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, db: Database, users: UserTokens, launcher: Launcher, wake_reconciler: Callable[[], None],
                 reach_violations: Callable[[JobSpec], list[FieldViolation]] = lambda spec: []):
        self.db = db
        # What a valid spec may not reach on this server (data roots, test hooks, directories): server.py.
        self.reach_violations = reach_violations
        self.users = users
        self.launcher = launcher
        self.wake_reconciler = wake_reconciler

    # -- CreateJob ---------------------------------------------------------------------------------------

    def CreateJob(self, request, context):
        if not request.HasField("spec"):
            abort_field(context, "spec", "required")
        try:
            spec = spec_from_proto(request.spec)
        except SpecError as exc:
            abort_invalid(context, [FieldViolation(_join("spec", v.field), v.description) for v in exc.violations])
        violations = self.reach_violations(spec)
        if violations:  # what the spec may reach under this server's policy; nothing is written
            abort_invalid(context, [FieldViolation(_join("spec", v.field), v.description) for v in violations])
        principal = self.users.lookup(bearer_token(context.invocation_metadata()))
        owner = principal.user if principal else ""
        now = utcnow()
        new_job = NewJob(
            job={"name": spec.name, "uid": str(uuid.uuid4()), "spec": spec.model_dump(mode="json", exclude_none=True),
                 "state": JobState.QUEUED, "state_reason": "Created", "owner": owner, "total_steps": spec.training.steps,
                 "max_restarts": spec.restart_policy.max_restarts, "create_time": now, "update_time": now},
            labels=spec.labels,
            event={"job_name": spec.name, "type": "StateChanged", "to_state": JobState.QUEUED, "reason": "Created",
                   "message": f"submitted by {owner or 'unknown'}", "create_time": now})
        try:
            self.db.create_job(new_job)
        except NameTaken:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"job jobs/{spec.name} already exists")
        self.wake_reconciler()
        created = convert.timestamp(now)
        return job_pb2.Job(name=f"jobs/{spec.name}", uid=new_job.job["uid"], spec=spec_to_proto(spec),
                           state=job_pb2.JOB_STATE_QUEUED, state_reason="Created", owner=owner,
                           total_steps=spec.training.steps, create_time=created, update_time=created)

    # -- GetJob / ListJobs -------------------------------------------------------------------------------

    def GetJob(self, request, context):
        with self.db.read() as session:
            return convert.job_to_proto(self._get(session, request.name, context))

    def ListJobs(self, request, context):
        if request.page_size < 0:
            abort_field(context, "page_size", "must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        states = [convert.job_state_from_proto(s) for s in request.states]
        filter_key = list_filter_key(states, dict(request.labels), request.page_size)
        after = None
        if request.page_token:
            after = decode_page_token(request.page_token, filter_key)
            if after is None:
                abort_field(context, "page_token", "not a token from a ListJobs call with the same filter")
        query = select_jobs(states, dict(request.labels), after, page_size + 1)
        with self.db.read() as session:
            jobs = session.scalars(query).all()
            response = job_service_pb2.ListJobsResponse(jobs=[convert.job_to_proto(j) for j in jobs[:page_size]])
        if len(jobs) > page_size:
            last = jobs[page_size - 1]
            response.next_page_token = encode_page_token(last.create_time, last.name, filter_key)
        return response

    # -- ListCheckpoints ---------------------------------------------------------------------------------

    def ListCheckpoints(self, request, context):
        if request.page_size < 0:
            abort_field(context, "page_size", "must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = select(Checkpoint).order_by(Checkpoint.step.desc()).limit(page_size + 1)
        with self.db.read() as session:
            job = self._get(session, request.parent, context, field="parent")
            query = query.where(Checkpoint.job_name == job.name)
            if request.page_token:
                before = _decode_checkpoint_token(request.page_token, job.name, page_size)
                if before is None:
                    abort_field(context, "page_token", "not a token from a ListCheckpoints call for this job")
                query = query.where(Checkpoint.step < before)
            rows = session.scalars(query).all()
            response = job_service_pb2.ListCheckpointsResponse(
                checkpoints=[convert.checkpoint_to_proto(c) for c in rows[:page_size]])
        if len(rows) > page_size:
            response.next_page_token = _encode_checkpoint_token(rows[page_size - 1].step, job.name, page_size)
        return response

    # -- CancelJob ---------------------------------------------------------------------------------------

    def CancelJob(self, request, context):
        principal = self.users.lookup(bearer_token(context.invocation_metadata()))
        with self.db.session() as session:
            job = self._get(session, request.name, context)
            try:
                request_cancel(session, job, principal)
            except CancelRefused as exc:
                context.abort(exc.grpc_code, str(exc))
            result = convert.job_to_proto(job)
        self.wake_reconciler()
        return result

    # -- WatchJob ----------------------------------------------------------------------------------------

    def WatchJob(self, request, context):
        with self.db.read() as session:
            self._get(session, request.name, context)
        name = convert.job_id_from_name(request.name)
        last_event = request.after_event_id
        last_metric = self._first_metric_id(name, request.after_step)
        last_job_version = None
        while context.is_active():
            with self.db.read() as session:
                job = session.get(Job, name)
                events = session.scalars(select(Event).where(Event.job_name == name, Event.id > last_event)
                                         .order_by(Event.id).limit(WATCH_BATCH)).all()
                metrics = session.scalars(select(Metric).where(Metric.job_name == name, Metric.id > last_metric)
                                          .order_by(Metric.id).limit(WATCH_BATCH)).all()
                version = (job.update_time, job.current_step, job.state)
                if events or metrics or version != last_job_version:
                    yield job_service_pb2.JobUpdate(
                        job=convert.job_to_proto(job),
                        events=[convert.event_to_proto(e) for e in events],
                        metrics=[convert.metric_to_proto(m) for m in metrics])
                last_event = events[-1].id if events else last_event
                last_metric = metrics[-1].id if metrics else last_metric
                last_job_version = version
                finished = JobState(job.state).terminal and len(events) < WATCH_BATCH and len(metrics) < WATCH_BATCH
            if finished:
                return
            time.sleep(WATCH_POLL_SECONDS)

    def _first_metric_id(self, name: str, after_step: int) -> int:
        """Metric ids are the stream's cursor; start before the first point past `after_step`."""
        with self.db.read() as session:
            if after_step < 0:
                return session.scalar(select(Metric.id).where(Metric.job_name == name)
                                      .order_by(Metric.id.desc()).limit(1)) or 0
            first = session.scalar(select(Metric.id).where(Metric.job_name == name, Metric.step > after_step)
                                   .order_by(Metric.id).limit(1))
            return first - 1 if first else (session.scalar(select(Metric.id).order_by(Metric.id.desc()).limit(1))
                                            or 0)

    # -- StreamLogs --------------------------------------------------------------------------------------

    def StreamLogs(self, request, context):
        with self.db.read() as session:
            job = self._get(session, request.name, context)
            if not job.attempts:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job {job.resource_name} has not launched yet")
            if request.attempt:
                attempt = next((a for a in job.attempts if a.number == request.attempt), None)
                if attempt is None:
                    abort_field(context, "attempt", f"job has no attempt {request.attempt}")
            else:
                attempt = job.current_attempt
            if not 0 <= request.rank < attempt.world_size:
                abort_field(context, "rank", f"must be in [0, {attempt.world_size}) for attempt {attempt.number}")
            ref = AttemptRef(job.name, attempt.number, dict(attempt.launch_info))

        def attempt_ended() -> bool:
            if not context.is_active():
                return True
            with self.db.read() as session:
                job = session.get(Job, ref.job)
                current = next(a for a in job.attempts if a.number == ref.attempt)
                return AttemptState(current.state).terminal or JobState(job.state).terminal

        for text in self.launcher.logs(ref, request.rank, request.follow, attempt_ended):
            yield job_service_pb2.LogChunk(attempt=ref.attempt, rank=request.rank, text=text)

    # -- helpers -----------------------------------------------------------------------------------------

    def _get(self, session, name: str, context, field: str = "name") -> Job:
        job_id = convert.job_id_from_name(name)
        if job_id is None:
            abort_field(context, field, f"{name!r} is not a job name (\"jobs/{{job_id}}\")")
        job = session.get(Job, job_id)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job jobs/{job_id} not found")
        return job


# -- shared with the dashboard -------------------------------------------------------------------------------


def select_jobs(states: list[str], labels: dict[str, str], after: tuple[datetime, str] | None, limit: int):
    """Jobs newest first, filtered by state (any of) and labels (all of), after a keyset cursor."""
    query = select(Job).order_by(Job.create_time.desc(), Job.name.desc()).limit(limit)
    if states:
        query = query.where(Job.state.in_(states))
    for key, value in sorted(labels.items()):
        query = query.where(exists().where(and_(JobLabel.job_name == Job.name, JobLabel.key == key,
                                                JobLabel.value == value)))
    if after is not None:
        created, name = after
        query = query.where(or_(Job.create_time < created, and_(Job.create_time == created, Job.name < name)))
    return query


class CancelRefused(Exception):
    def __init__(self, grpc_code: grpc.StatusCode, http_status: int, message: str):
        super().__init__(message)
        self.grpc_code = grpc_code
        self.http_status = http_status


def may_cancel(principal: Principal | None, job: Job) -> bool:
    """Admins cancel any job; other users only their own."""
    return principal is not None and (principal.role == "admin" or principal.user == job.owner)


def request_cancel(session, job: Job, principal: Principal | None) -> None:
    """Marks the job for cancelling (the reconciler stops its ranks) and records who asked. The one rule for
    every way in: the gRPC CancelJob and the dashboard's cancel button."""
    if not may_cancel(principal, job):
        raise CancelRefused(grpc.StatusCode.PERMISSION_DENIED, 403,
                            f"{principal.user if principal else 'anonymous'} may not cancel {job.resource_name} "
                            f"(only its owner {job.owner or '(none)'} or an admin)")
    if JobState(job.state).terminal:
        raise CancelRefused(grpc.StatusCode.FAILED_PRECONDITION, 409,
                            f"job {job.resource_name} already ended ({job.state}); nothing to cancel")
    if not job.cancel_requested:
        job.cancel_requested = True
        attempt = job.current_attempt
        record_event(session, job, "CancelRequested", "CancelRequested", f"cancel requested by {principal.user}",
                     attempt=attempt.number if attempt else None)


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix


def list_filter_key(states: list[str], labels: dict[str, str], page_size: int) -> str:
    """What a job listing's page token is bound to: a token from one filter is refused by another."""
    text = json.dumps([sorted(states), sorted(labels.items()), page_size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_page_token(created: datetime, name: str, filter_key: str) -> str:
    return _encode_token({"t": created.isoformat(), "n": name, "f": filter_key})


def decode_page_token(token: str, filter_key: str) -> tuple[datetime, str] | None:
    """The (create time, name) the next page of jobs starts after, if the token is for this filter."""
    data = _decode_token(token)
    try:
        return (datetime.fromisoformat(data["t"]), str(data["n"])) if data["f"] == filter_key else None
    except (ValueError, KeyError, TypeError):
        return None


def _encode_checkpoint_token(step: int, job: str, page_size: int) -> str:
    return _encode_token({"s": step, "j": job, "p": page_size})


def _decode_checkpoint_token(token: str, job: str, page_size: int) -> int | None:
    """The step the next page starts below, if the token is for this job and page size."""
    data = _decode_token(token)
    try:
        return int(data["s"]) if (data["j"], data["p"]) == (job, page_size) else None
    except (ValueError, KeyError, TypeError):
        return None


def _encode_token(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _decode_token(token: str) -> dict:
    """What _encode_token wrote, or {} for anything else."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
