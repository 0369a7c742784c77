"""Store rows to API messages."""

from __future__ import annotations

import math
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator import store
from orchestrator.auth import Principal
from orchestrator.service.access import visible_spec
from contract.spec import dict_to_message
from roundhouse.v1 import job_pb2

def job_state_to_proto(state: str | None) -> int:
    return job_pb2.JobState.Value(f"JOB_STATE_{state}") if state else job_pb2.JOB_STATE_UNSPECIFIED


def job_state_name(value: int) -> str:
    """JOB_STATE_RUNNING -> "RUNNING"; a number this version does not know stays a number (and is refused
    as an unknown state)."""
    try:
        return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
    except ValueError:
        return str(value)


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def attempt_to_proto(attempt: store.Attempt) -> job_pb2.Attempt:
    return job_pb2.Attempt(
        number=attempt.number,
        state=job_pb2.AttemptState.Value(f"ATTEMPT_STATE_{attempt.state}"),
        layout=job_pb2.Layout(tp=attempt.tp, pp=attempt.pp, dp=attempt.dp),
        world_size=attempt.world_size,
        start_step=attempt.start_step,
        create_time=timestamp(attempt.create_time),
        end_time=timestamp(attempt.end_time),
        end_reason=attempt.end_reason,
    )


def job_to_proto(job: store.Job, principal: Principal | None, full: bool = True) -> job_pb2.Job:
    """The job as `principal` may see it (env values only for its owner and admins: access.visible_spec); with
    `full` False its basic view (JOB_VIEW_BASIC): of the spec, only its parallelism."""
    spec = visible_spec(principal, job) if full else {"parallelism": job.spec.get("parallelism", {})}
    return job_pb2.Job(
        name=job.resource_name,
        uid=job.uid,
        spec=dict_to_message(spec, job_pb2.JobSpec()),
        state=job_state_to_proto(job.state),
        state_reason=job.state_reason,
        state_message=job.state_message,
        owner=job.owner,
        current_step=job.current_step,
        total_steps=job.total_steps,
        last_loss=job.last_loss,
        tokens_per_second=job.tokens_per_second,
        restart_count=job.restart_count,
        hang_restart_count=job.hang_restart_count,
        preemption_count=job.preemption_count,
        checkpoint_step=job.checkpoint_step,
        cancel_requested=job.cancel_requested,
        attempts=[attempt_to_proto(a) for a in job.attempts],
        create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
        start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time),
    )


def checkpoint_to_proto(checkpoint: store.Checkpoint) -> job_pb2.Checkpoint:
    return job_pb2.Checkpoint(
        step=checkpoint.step,
        attempt=checkpoint.attempt,
        layout=job_pb2.Layout(tp=checkpoint.tp, pp=checkpoint.pp, dp=checkpoint.dp),
        path=checkpoint.path,
        size_bytes=checkpoint.size_bytes,
        commit_time=timestamp(checkpoint.commit_time),
    )


def event_to_proto(event: store.Event) -> job_pb2.Event:
    return job_pb2.Event(
        id=event.id,
        attempt=event.attempt or 0,
        type=event.type,
        from_state=job_state_to_proto(event.from_state),
        to_state=job_state_to_proto(event.to_state),
        reason=event.reason,
        message=event.message,
        create_time=timestamp(event.create_time),
    )


def metric_to_proto(metric: store.Metric) -> job_pb2.MetricPoint:
    return job_pb2.MetricPoint(
        step=metric.step,
        attempt=metric.attempt,
        rank=metric.rank,
        loss=metric.loss,
        val_loss=metric.val_loss,
        tokens_per_second=metric.tokens_per_second,
        memory_bytes=metric.memory_bytes,
        learning_rate=metric.learning_rate,
        time=timestamp(metric.time),
        sigma_max={name: math.nan if value is None else value for name, value in (metric.sigma_max or {}).items()},
    )
