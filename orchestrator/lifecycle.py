"""The job state machine. Every change of a job's state goes through `transition`, which checks that the
move is allowed and writes the audit event in the caller's transaction, so the two commit together."""

from __future__ import annotations

from sqlalchemy.orm import Session

from orchestrator.store import Event, Job, JobState, utcnow

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.LAUNCHING, JobState.CANCELLED, JobState.FAILED}),
    JobState.LAUNCHING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.RESTARTING, JobState.FAILED,
                                   JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.RESTARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RESTARTING: frozenset({JobState.LAUNCHING, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def transition(session: Session, job: Job, to: JobState, reason: str, message: str = "",
               attempt: int | None = None) -> Event:
    current = JobState(job.state)
    if to not in ALLOWED[current]:
        raise IllegalTransition(f"job {job.name}: {current} -> {to} is not allowed")
    now = utcnow()
    job.state = to
    job.state_reason = reason
    job.state_message = message
    job.update_time = now
    if to is JobState.RUNNING and job.start_time is None:
        job.start_time = now
    if to.terminal:
        job.end_time = now
    event = Event(job_name=job.name, attempt=attempt, type="StateChanged", from_state=current, to_state=to,
                  reason=reason, message=message, create_time=now)
    session.add(event)
    return event


def record_event(session: Session, job: Job, type_: str, reason: str, message: str = "",
                 attempt: int | None = None) -> Event:
    """An event that is not a state change (a launch, a rank's failure, a restart decision)."""
    event = Event(job_name=job.name, attempt=attempt, type=type_, reason=reason, message=message,
                  create_time=utcnow())
    session.add(event)
    return event
