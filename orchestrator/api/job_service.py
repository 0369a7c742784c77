"""roundhouse.v1.JobService: what users call. Handlers validate at the edge, write durable intent, and
wake the reconciler; they never launch or stop ranks themselves. Queries and who may do what are the
service layer's (orchestrator/service/); this module turns requests into its calls and its answers into
messages."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from orchestrator import service
from orchestrator.api import convert
from orchestrator.api.errors import abort_field, abort_invalid, abort_refused_async, invalid_status, refusals
from orchestrator.api.streams import JobChanges, Streams
from orchestrator.auth import Principal, UserTokens, bearer_token
from orchestrator.launcher import Launcher, LogsUnavailable
from orchestrator.launcher.logs import LogRange
from orchestrator.service import access, jobs
from orchestrator.service.access import Action
from orchestrator.service.limits import Limits, Quotas
from contract.spec import FieldViolation, JobSpec, SpecError, spec_from_proto, spec_to_proto, spec_warnings
from orchestrator.store import Database, Job, JobState, NameTaken
from roundhouse.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

WATCH_POLL_SECONDS = 0.25  # how often the watched jobs are looked at (all of them at once)
WATCH_BATCH = 1000
LOG_POLL_SECONDS = 0.2  # a followed log that has nothing new is read again after this


class JobService(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, db: Database, users: UserTokens, launcher: Launcher, wake_reconciler: Callable[[str], None],
                 streams: Streams, reach_violations: Callable[[JobSpec], list[FieldViolation]] = lambda spec: [],
                 quotas: Quotas | None = None):
        self.db = db
        # The streaming calls are coroutines on the event loop (orchestrator/api/streams.py); the rest block,
        # on the server's pool. Watches read their job when the one poll for all of them says it changed.
        self.streams = streams
        self.job_changes = JobChanges(db, streams, WATCH_POLL_SECONDS)
        # The operator's limits and per-user quotas (orchestrator/service/limits.py), shared with SweepService.
        self.quotas = quotas or Quotas(Limits())
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
        principal = self._authorized(context, Action.SUBMIT)
        # What the spec may reach under this server's policy, and the operator's limits; nothing is written.
        violations = self.reach_violations(spec) + self.quotas.limits.violations(spec)
        if violations:
            abort_invalid(context, [FieldViolation(_join("spec", v.field), v.description) for v in violations])
        spec = self.quotas.limits.with_defaults(spec)
        owner = principal.user if principal else ""
        # What may fail at run time without being a reason to refuse (e.g. offload's pinned memory over
        # resources.memory): the API has no field for it, so the job's first event says it.
        warnings = "".join(f"; warning: {_join('spec', w.field)}: {w.description}" for w in spec_warnings(spec))
        new_job = jobs.new_job(spec, owner, message=f"submitted by {owner or 'unknown'}{warnings}")
        now = new_job.job["create_time"]
        with refusals(context), self.quotas.admit(self.db, owner, jobs=1, ranks=spec.world_size):
            try:
                self.db.create_job(new_job)
            except NameTaken:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"job jobs/{spec.name} already exists")
        self.wake_reconciler(spec.name)
        created = convert.timestamp(now)
        return job_pb2.Job(name=f"jobs/{spec.name}", uid=new_job.job["uid"], spec=spec_to_proto(spec),
                           state=job_pb2.JOB_STATE_QUEUED, state_reason="Created", owner=owner,
                           total_steps=spec.training.steps, create_time=created, update_time=created)

    # -- GetJob / ListJobs / ListCheckpoints --------------------------------------------------------------

    def GetJob(self, request, context):
        with self.db.read() as session, refusals(context):
            principal = self._principal(context)
            return convert.job_to_proto(jobs.get_job(session, principal, request.name, with_labels=False), principal)

    def ListJobs(self, request, context):
        states = [convert.job_state_name(s) for s in request.states]
        if request.view not in _JOB_VIEWS:
            abort_field(context, "view", f"unknown view {request.view} (JOB_VIEW_BASIC or JOB_VIEW_FULL)")
        full = request.view == job_service_pb2.JOB_VIEW_FULL
        principal = self._principal(context)
        with self.db.read() as session, refusals(context):
            page = jobs.list_jobs(session, principal, states, dict(request.labels), request.page_size,
                                  request.page_token, with_labels=False)
            return job_service_pb2.ListJobsResponse(jobs=[convert.job_to_proto(j, principal, full) for j in page.items],
                                                    next_page_token=page.next_page_token)

    def ListCheckpoints(self, request, context):
        with self.db.read() as session, refusals(context):
            page = jobs.list_checkpoints(session, self._principal(context), request.parent, request.page_size,
                                         request.page_token)
            return job_service_pb2.ListCheckpointsResponse(
                checkpoints=[convert.checkpoint_to_proto(c) for c in page.items],
                next_page_token=page.next_page_token)

    # -- CancelJob ---------------------------------------------------------------------------------------

    def CancelJob(self, request, context):
        principal = self._principal(context)
        with self.db.session() as session, refusals(context):
            job = jobs.cancel_job(session, principal, request.name)
            result, name = convert.job_to_proto(job, principal), job.name
        self.wake_reconciler(name)
        return result

    # -- WatchJob ----------------------------------------------------------------------------------------

    async def WatchJob(self, request, context):
        principal = await self.streams.principal(context)
        async with self.streams.slot(principal, context):
            try:
                watch = await self.streams.run(self._start_watch, principal, request)
            except service.ServiceError as error:
                await abort_refused_async(context, error)
            async with self.job_changes.subscribe(watch.name) as changed:
                while True:
                    await self.job_changes.wait(changed)
                    update, finished = await self.streams.run(self._watch_step, watch)
                    if update is not None:
                        yield update
                    if finished:
                        return

    def _start_watch(self, principal: Principal, request) -> _Watch:
        with self.db.read() as session:
            job = jobs.get_job(session, principal, request.name)
            return _Watch(job.name, principal, request.after_event_id,
                          jobs.metric_cursor_after_step(session, job, request.after_step))

    def _watch_step(self, watch: _Watch) -> tuple[job_service_pb2.JobUpdate | None, bool]:
        """What changed since the last step (None: nothing), and whether the watch is over."""
        with self.db.read() as session:
            job = session.get(Job, watch.name)
            events = jobs.events_after(session, job, watch.last_event, WATCH_BATCH)
            metrics = jobs.metrics_after(session, job, watch.last_metric, WATCH_BATCH)
            version = (job.update_time, job.current_step, job.state)
            update = None
            if events or metrics or version != watch.job_version:
                update = job_service_pb2.JobUpdate(job=convert.job_to_proto(job, watch.principal),
                                                   events=[convert.event_to_proto(e) for e in events],
                                                   metrics=[convert.metric_to_proto(m) for m in metrics])
            watch.last_event = events[-1].id if events else watch.last_event
            watch.last_metric = metrics[-1].id if metrics else watch.last_metric
            watch.job_version = version
            return update, JobState(job.state).terminal and len(events) < WATCH_BATCH and len(metrics) < WATCH_BATCH

    # -- StreamLogs --------------------------------------------------------------------------------------

    async def StreamLogs(self, request, context):
        where = _log_range(request)
        if isinstance(where, FieldViolation):
            status = invalid_status([where])
            await context.abort(status.code, status.details, status.trailing_metadata)
        principal = await self.streams.principal(context)
        async with self.streams.slot(principal, context):
            try:
                ref = await self.streams.run(self._log_source, principal, request)
            except service.ServiceError as error:
                await abort_refused_async(context, error)

            def attempt_ended() -> bool:
                with self.db.read() as session:
                    return jobs.attempt_ended(session, ref)

            reads = self.launcher.logs(ref, request.rank, request.follow, attempt_ended, where)
            # A character split between two reads is held back and sent whole with the next.
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            end = 0
            try:
                while (read := await self._next_log_read(reads, context)) is not None:
                    if not read.data:  # following, and nothing new yet
                        await asyncio.sleep(LOG_POLL_SECONDS)
                        continue
                    text = decoder.decode(read.data)
                    held_back = len(decoder.getstate()[0])
                    if text:
                        yield job_service_pb2.LogChunk(attempt=ref.attempt, rank=request.rank, text=text,
                                                       next_offset=read.offset + len(read.data) - held_back)
                    end = read.offset + len(read.data)
                rest = decoder.decode(b"", final=True)
                if rest:  # the log ends in the middle of a character
                    yield job_service_pb2.LogChunk(attempt=ref.attempt, rank=request.rank, text=rest, next_offset=end)
            finally:
                _close(reads)

    async def _next_log_read(self, reads, context):
        """The next read of a rank's log; a log whose node cannot serve it now ends the stream UNAVAILABLE."""
        try:
            return await self.streams.run_log(next, reads, None)
        except LogsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def _log_source(self, principal: Principal, request):
        with self.db.read() as session:
            return jobs.log_source(session, principal, request.name, request.rank, request.attempt)

    # -- helpers -----------------------------------------------------------------------------------------

    def _principal(self, context) -> Principal | None:
        return self.users.lookup(bearer_token(context.invocation_metadata()))

    def _authorized(self, context, action: Action) -> Principal:
        principal = self._principal(context)
        with refusals(context):
            access.authorize(principal, action)
        return principal


@dataclass
class _Watch:
    """Where a WatchJob stream is: what it has sent so far."""

    name: str
    principal: Principal  # who watches: what of the job it may see (env values)
    last_event: int
    last_metric: int
    job_version: tuple | None = None


def _close(reads) -> None:
    """Closes a launcher's log reader (its file, its stream). One still reading on a thread of the log pool
    (a cancelled call) is left to end by itself, at its next piece."""
    try:
        reads.close()
    except ValueError:  # "generator already executing"
        pass


def _log_range(request) -> LogRange | FieldViolation:
    asked = [(name, getattr(request, name)) for name in ("offset", "tail_bytes", "tail_lines")]
    for name, value in asked:
        if value < 0:
            return FieldViolation(name, "must not be negative")
    if sum(1 for _, value in asked if value) > 1:
        return FieldViolation("offset", "give at most one of offset, tail_bytes and tail_lines")
    return LogRange(offset=request.offset, tail_bytes=request.tail_bytes, tail_lines=request.tail_lines)


_JOB_VIEWS = frozenset(job_service_pb2.JobView.values())


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix
