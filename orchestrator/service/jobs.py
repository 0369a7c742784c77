"""Jobs as callers see them: get and list (keyset pages, filters), checkpoints, events, metrics, ranks,
which attempt's log to read, and cancel. Every function takes the caller's session (the caller decides
the transaction) and the principal asking, and checks `access.authorize` before it answers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session, joinedload, lazyload

from orchestrator.auth import Principal
from orchestrator.launcher import AttemptRef
from orchestrator.lifecycle import record_event
from orchestrator.service import pages
from orchestrator.service.access import Action, allowed, authorize
from orchestrator.service.errors import FailedPrecondition, InvalidArgument, NotFound
from contract.errors import clip
from contract.spec import MAX_LABELS, JobSpec, label_problem
from orchestrator.store import (JOB_KIND, AttemptState, Checkpoint, Event, Job, JobLabel, JobState, Metric, NewJob,
                                RankStatus, utcnow)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
JOB_PREFIX = "jobs/"
# Used with fullmatch: "$" would let "nl-test\n" name the job nl-test.
_JOB_NAME = re.compile(r"(?:jobs/)?([a-z0-9]([-a-z0-9]*[a-z0-9])?)")

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""


def job_id(name: str) -> str | None:
    """The id in "jobs/{id}" or a bare id; None if `name` cannot name a job."""
    match = _JOB_NAME.fullmatch(name or "") if len(name or "") <= 68 else None
    return match.group(1) if match and len(match.group(1)) <= 63 else None


def get_job(session: Session, principal: Principal | None, name: str, field: str = "name",
            with_labels: bool = True) -> Job:
    """The job named `name` ("jobs/{id}" or "{id}"); `field` is the request field it came from. Without
    `with_labels` its label rows are not read (the spec has the labels too); read if asked for in `session`."""
    authorize(principal, Action.READ)
    return _find(session, name, field, with_labels)


def list_jobs(session: Session, principal: Principal | None, states: Iterable[str] = (),
              labels: Mapping[str, str] | None = None, page_size: int = 0, page_token: str = "",
              with_labels: bool = True) -> Page[Job]:
    """Jobs newest first, in any of `states` and with all of `labels`, one page after `page_token`. Without
    `with_labels` their label rows are not read (as get_job)."""
    authorize(principal, Action.READ)
    states = sorted({str(s) for s in states})
    unknown = [s for s in states if s not in JobState.__members__]
    if unknown:
        raise InvalidArgument("states", f"unknown {', '.join(unknown[:5])} (one of: {', '.join(JobState)})")
    labels = dict(labels or {})
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"{len(labels)} labels; at most {MAX_LABELS}")
    for key, value in labels.items():
        problem = label_problem(key, value)
        if problem:
            raise InvalidArgument(f"labels.{key}", problem)
    page_size = _page_size(page_size)
    filter_key = pages.job_filter_key(states, labels, page_size)
    after = None
    if page_token:
        after = pages.decode_job_token(page_token, filter_key)
        if after is None:
            raise InvalidArgument("page_token", "not a token from a job listing with the same filter")
    query = _select_jobs(states, labels, after, page_size + 1)
    jobs = session.scalars(query if with_labels else query.options(lazyload(Job.labels))).all()
    page = Page(list(jobs[:page_size]))
    if len(jobs) > page_size:
        last = jobs[page_size - 1]
        page.next_page_token = pages.encode_job_token(last.create_time, last.name, filter_key)
    return page


def list_checkpoints(session: Session, principal: Principal | None, parent: str, page_size: int = 0,
                     page_token: str = "") -> Page[Checkpoint]:
    """The job's kept checkpoints, newest first."""
    job = get_job(session, principal, parent, field="parent")
    page_size = _page_size(page_size)
    query = (select(Checkpoint).where(Checkpoint.job_name == job.name).order_by(Checkpoint.step.desc())
             .limit(page_size + 1))
    if page_token:
        before = pages.decode_checkpoint_token(page_token, job.name, page_size)
        if before is None:
            raise InvalidArgument("page_token", "not a token from a checkpoint listing of this job")
        query = query.where(Checkpoint.step < before)
    rows = session.scalars(query).all()
    page = Page(list(rows[:page_size]))
    if len(rows) > page_size:
        page.next_page_token = pages.encode_checkpoint_token(rows[page_size - 1].step, job.name, page_size)
    return page


def new_job(spec: JobSpec, owner: str, kind: str = JOB_KIND, parent: str | None = None,
            message: str = "") -> NewJob:
    """The rows of a job as submitted (QUEUED, with its "Created" event), for `Database.create_job`: a user's
    job, or a child of a resource (`kind`, `parent`: a sweep's trials and target)."""
    now = utcnow()
    return NewJob(
        job={"name": spec.name, "uid": str(uuid.uuid4()), "kind": kind, "parent": parent,
             "spec": spec.model_dump(mode="json", exclude_none=True), "state": JobState.QUEUED,
             "state_reason": "Created", "owner": owner, "total_steps": spec.training.steps,
             "max_restarts": spec.restart_policy.max_restarts, "create_time": now, "update_time": now},
        labels=spec.labels,
        event={"job_name": spec.name, "type": "StateChanged", "to_state": JobState.QUEUED, "reason": "Created",
               "message": message or f"submitted by {owner or 'unknown'}", "create_time": now})


# -- a job's history: read after get_job, which checked the caller may read it -----------------------------


def checkpoints_of(session: Session, job: Job) -> list[Checkpoint]:
    """Every kept checkpoint, oldest first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_name == job.name)
                                .order_by(Checkpoint.step)).all())


def events_after(session: Session, job: Job, after_id: int, limit: int) -> list[Event]:
    """Up to `limit` events after the event id `after_id` (the watch's cursor), oldest first."""
    return list(session.scalars(select(Event).where(Event.job_name == job.name, Event.id > after_id)
                                .order_by(Event.id).limit(limit)).all())


def newest_events(session: Session, job: Job, limit: int) -> list[Event]:
    """The newest `limit` events, oldest first."""
    rows = session.scalars(select(Event).where(Event.job_name == job.name)
                           .order_by(Event.id.desc()).limit(limit)).all()
    return list(reversed(rows))


def metrics_after(session: Session, job: Job, after_id: int, limit: int) -> list[Metric]:
    """Up to `limit` metric points after the metric id `after_id`, in the order they were reported."""
    return list(session.scalars(select(Metric).where(Metric.job_name == job.name, Metric.id > after_id)
                                .order_by(Metric.id).limit(limit)).all())


def metric_cursor_after_step(session: Session, job: Job, after_step: int) -> int:
    """The metric id to read after to get the points past `after_step` (negative: only new points)."""
    if after_step < 0:
        return session.scalar(select(Metric.id).where(Metric.job_name == job.name)
                              .order_by(Metric.id.desc()).limit(1)) or 0
    first = session.scalar(select(Metric.id).where(Metric.job_name == job.name, Metric.step > after_step)
                           .order_by(Metric.id).limit(1))
    if first:
        return first - 1
    return session.scalar(select(Metric.id).order_by(Metric.id.desc()).limit(1)) or 0


def ranks_of(session: Session, job: Job) -> list[RankStatus]:
    """The heartbeats of the current attempt's ranks, by rank."""
    attempt = job.current_attempt
    if attempt is None:
        return []
    return list(session.scalars(select(RankStatus).where(RankStatus.job_name == job.name,
                                                         RankStatus.attempt == attempt.number)
                                .order_by(RankStatus.rank)).all())


# -- logs --------------------------------------------------------------------------------------------------


def log_source(session: Session, principal: Principal | None, name: str, rank: int,
               attempt: int = 0) -> AttemptRef:
    """Which attempt's log of `rank` to read (attempt 0: the newest); the launcher reads it."""
    job = get_job(session, principal, name)
    if not job.attempts:
        raise FailedPrecondition(f"job {job.resource_name} has not launched yet")
    if attempt:
        chosen = next((a for a in job.attempts if a.number == attempt), None)
        if chosen is None:
            raise InvalidArgument("attempt", f"job has no attempt {attempt}")
    else:
        chosen = job.current_attempt
    if not 0 <= rank < chosen.world_size:
        raise InvalidArgument("rank", f"must be in [0, {chosen.world_size}) for attempt {chosen.number}")
    return AttemptRef(job.name, chosen.number, dict(chosen.launch_info))


def attempt_ended(session: Session, ref: AttemptRef) -> bool:
    """Whether a followed log is complete: its attempt (or its job) has ended."""
    job = session.get(Job, ref.job)
    current = next(a for a in job.attempts if a.number == ref.attempt)
    return AttemptState(current.state).terminal or JobState(job.state).terminal


# -- cancel ------------------------------------------------------------------------------------------------


def may_cancel(principal: Principal | None, job: Job) -> bool:
    """Whether a cancel by `principal` would be accepted now (what the dashboard's button shows)."""
    return allowed(principal, Action.CANCEL, job) and not JobState(job.state).terminal


def cancel_job(session: Session, principal: Principal | None, name: str) -> Job:
    """Marks the job for cancelling (the reconciler stops its ranks) and records who asked. Call in a
    writing session, then wake the reconciler."""
    job = get_job(session, principal, name)
    authorize(principal, Action.CANCEL, job)
    if JobState(job.state).terminal:
        raise FailedPrecondition(f"job {job.resource_name} already ended ({job.state}); nothing to cancel")
    if not job.cancel_requested:
        job.cancel_requested = True
        attempt = job.current_attempt
        record_event(session, job, "CancelRequested", "CancelRequested", f"cancel requested by {principal.user}",
                     attempt=attempt.number if attempt else None)
    return job


# -- helpers -----------------------------------------------------------------------------------------------


def _find(session: Session, name: str, field: str, with_labels: bool = True) -> Job:
    found = job_id(name)
    if found is None:
        raise InvalidArgument(field, f"{clip(name, 100)!r} is not a job name (\"jobs/{{job_id}}\")")
    # One query for the job and its attempts, not one each (the relationships load "selectin" by default):
    # on PostgreSQL each is a round trip, and a GetJob paid three.
    options = [joinedload(Job.attempts)] + ([] if with_labels else [lazyload(Job.labels)])
    job = session.get(Job, found, options=options)
    if job is None:
        raise NotFound(f"job jobs/{found} not found")
    return job


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _select_jobs(states: list[str], labels: dict[str, str], after: tuple[datetime, str] | None, limit: int):
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
