"""roundhouse.v1.JobService: what users call. Handlers validate at the edge, write durable intent, and
wake the reconciler; they never launch or stop ranks themselves. Queries and who may do what are the
service layer's (orchestrator/service/); this module turns requests into its calls and its answers into
messages."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from orchestrator.api import convert
from orchestrator.api.errors import abort_field, abort_invalid, refusals
from orchestrator.auth import Principal, UserTokens, bearer_token
from orchestrator.launcher import Launcher
from orchestrator.service import access, jobs
from orchestrator.service.access import Action
from orchestrator.service.limits import Limits, Quotas
from contract.spec import FieldViolation, JobSpec, SpecError, spec_from_proto, spec_to_proto, spec_warnings
from orchestrator.store import Database, Job, JobState, NameTaken
from roundhouse.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

WATCH_POLL_SECONDS = 0.25
WATCH_BATCH = 1000


class JobService(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, db: Database, users: UserTokens, launcher: Launcher, wake_reconciler: Callable[[str], None],
                 reach_violations: Callable[[JobSpec], list[FieldViolation]] = lambda spec: [],
                 quotas: Quotas | None = None):
        self.db = db
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
            return convert.job_to_proto(jobs.get_job(session, self._principal(context), request.name))

    def ListJobs(self, request, context):
        states = [convert.job_state_name(s) for s in request.states]
        if request.view not in _JOB_VIEWS:
            abort_field(context, "view", f"unknown view {request.view} (JOB_VIEW_BASIC or JOB_VIEW_FULL)")
        full = request.view == job_service_pb2.JOB_VIEW_FULL
        with self.db.read() as session, refusals(context):
            page = jobs.list_jobs(session, self._principal(context), states, dict(request.labels), request.page_size,
                                  request.page_token)
            return job_service_pb2.ListJobsResponse(jobs=[convert.job_to_proto(j, full) for j in page.items],
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
        with self.db.session() as session, refusals(context):
            job = jobs.cancel_job(session, self._principal(context), request.name)
            result, name = convert.job_to_proto(job), job.name
        self.wake_reconciler(name)
        return result

    # -- WatchJob ----------------------------------------------------------------------------------------

    def WatchJob(self, request, context):
        principal = self._principal(context)
        with self.db.read() as session, refusals(context):
            job = jobs.get_job(session, principal, request.name)
            name = job.name
            last_metric = jobs.metric_cursor_after_step(session, job, request.after_step)
        last_event = request.after_event_id
        last_job_version = None
        while context.is_active():
            with self.db.read() as session:
                job = session.get(Job, name)
                events = jobs.events_after(session, job, last_event, WATCH_BATCH)
                metrics = jobs.metrics_after(session, job, last_metric, WATCH_BATCH)
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

    # -- StreamLogs --------------------------------------------------------------------------------------

    def StreamLogs(self, request, context):
        with self.db.read() as session, refusals(context):
            ref = jobs.log_source(session, self._principal(context), request.name, request.rank, request.attempt)

        def attempt_ended() -> bool:
            if not context.is_active():
                return True
            with self.db.read() as session:
                return jobs.attempt_ended(session, ref)

        for text in self.launcher.logs(ref, request.rank, request.follow, attempt_ended):
            yield job_service_pb2.LogChunk(attempt=ref.attempt, rank=request.rank, text=text)

    # -- helpers -----------------------------------------------------------------------------------------

    def _principal(self, context) -> Principal | None:
        return self.users.lookup(bearer_token(context.invocation_metadata()))

    def _authorized(self, context, action: Action) -> Principal:
        principal = self._principal(context)
        with refusals(context):
            access.authorize(principal, action)
        return principal


_JOB_VIEWS = frozenset(job_service_pb2.JobView.values())


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix
