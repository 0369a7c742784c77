"""The durable state of the control plane. The database is the source of truth: nothing the reconciler
decides lives only in memory. Times are naive UTC (`utcnow`) so SQLite and PostgreSQL agree."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    LAUNCHING = "LAUNCHING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The kind of a plain training job. A resource that owns jobs (a sweep's trials) names itself in `parent`.
JOB_KIND = "Job"


class AttemptState(enum.StrEnum):
    PENDING = "PENDING"  # recorded; ranks not yet (all) started
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.CANCELLED)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, int: Integer}


class Job(Base):
    __tablename__ = "jobs"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True)
    # What made the job and owns it: "Job" for one a user submitted; a parent resource's children (a
    # sweep's trials) carry their owner's resource name (e.g. "sweeps/x"), so the owner finds them again.
    kind: Mapped[str] = mapped_column(String(32), default=JOB_KIND, server_default=JOB_KIND)
    parent: Mapped[str | None] = mapped_column(String(128), index=True)
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(String(64), default="")
    state_message: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(128), default="")
    total_steps: Mapped[int] = mapped_column(BigInteger)
    current_step: Mapped[int] = mapped_column(BigInteger, default=0)
    last_loss: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    max_restarts: Mapped[int] = mapped_column(default=0)
    restart_count: Mapped[int] = mapped_column(default=0)  # restarts after crashes (max_restarts)
    # Separate budgets (restart_policy.max_hang_restarts, max_preemptions); the server defaults fill rows
    # written before these columns existed.
    hang_restart_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    preemption_count: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # The newest committed checkpoint's step (0: none): where the next attempt resumes.
    checkpoint_step: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Earliest time the reconciler may start the next attempt (restart backoff).
    next_attempt_time: Mapped[datetime | None] = mapped_column(DateTime)
    create_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    start_time: Mapped[datetime | None] = mapped_column(DateTime)
    end_time: Mapped[datetime | None] = mapped_column(DateTime)

    labels: Mapped[list[JobLabel]] = relationship(cascade="all, delete-orphan", lazy="selectin")
    attempts: Mapped[list[Attempt]] = relationship(
        cascade="all, delete-orphan", order_by="Attempt.number", lazy="selectin")

    __table_args__ = (Index("ix_jobs_create_time_name", "create_time", "name"),)

    @property
    def resource_name(self) -> str:
        return f"jobs/{self.name}"

    @property
    def current_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


class JobLabel(Base):
    """One row per label, so filtering by labels is a plain indexed join on every database."""

    __tablename__ = "job_labels"

    job_name: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(317), primary_key=True)
    value: Mapped[str] = mapped_column(String(63))

    __table_args__ = (Index("ix_job_labels_key_value", "key", "value"),)


class Attempt(Base):
    """One launch of a job's ranks, at one layout, from one start step."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_name: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"))
    number: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))
    tp: Mapped[int]
    pp: Mapped[int]
    dp: Mapped[int]
    world_size: Mapped[int]
    start_step: Mapped[int] = mapped_column(BigInteger, default=0)
    # What the launcher needs to find this attempt's ranks again after a control-plane restart.
    launch_info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    create_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    start_time: Mapped[datetime | None] = mapped_column(DateTime)
    end_time: Mapped[datetime | None] = mapped_column(DateTime)
    end_reason: Mapped[str] = mapped_column(Text, default="")
    # A stop in progress, a durable phase (cancel, a failure, a hang): the ranks were told to stop, and what
    # still runs at `stop_deadline` is killed. The attempt keeps its state (its ranks may still log and
    # checkpoint, and they hold their ranks) until they are gone; then it becomes `stop_outcome`.
    stop_deadline: Mapped[datetime | None] = mapped_column(DateTime)
    stop_outcome: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (UniqueConstraint("job_name", "number", name="uq_attempts_job_number"),)

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None and not AttemptState(self.state).terminal


class Event(Base):
    """The audit log: every state transition, written in the transaction that makes it."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_name: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), index=True)
    attempt: Mapped[int | None]
    type: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Metric(Base):
    """A time series per job: one row per reported step (and rank)."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_name: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"))
    attempt: Mapped[int]
    rank: Mapped[int]
    step: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    learning_rate: Mapped[float] = mapped_column(Float, default=0.0)
    time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # µP's diagnostic, on the steps that carry it: {global parameter name: top singular value, or None where it
    # was not finite}, at most contract.metrics.MAX_SIGMA_PARAMETERS entries.
    sigma_max: Mapped[dict[str, float | None] | None] = mapped_column(JSON(none_as_null=True))

    __table_args__ = (Index("ix_metrics_job_step", "job_name", "step"),)


class RankStatus(Base):
    """The last heartbeat of each rank of each attempt."""

    __tablename__ = "rank_status"

    job_name: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(primary_key=True)
    rank: Mapped[int] = mapped_column(primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, default=0)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # What the rank said it was doing at that heartbeat when not training ("" while it trains).
    phase: Mapped[str] = mapped_column(String(64), default="", server_default="")


class Checkpoint(Base):
    """A committed checkpoint (its manifest is on disk), as rank 0 reported it through ReportCheckpoint."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_name: Mapped[str] = mapped_column(ForeignKey("jobs.name", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]
    step: Mapped[int] = mapped_column(BigInteger)
    tp: Mapped[int]
    pp: Mapped[int]
    dp: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    commit_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("job_name", "step", name="uq_checkpoints_job_step"),)


class SweepState(enum.StrEnum):
    TUNING = "TUNING"  # trials run (or wait for ranks)
    TRAINING_TARGET = "TRAINING_TARGET"  # the best point is chosen; the target job runs
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (SweepState.SUCCEEDED, SweepState.FAILED, SweepState.CANCELLED)


# The kinds of a sweep's child jobs (their parent is "sweeps/<name>").
TRIAL_KIND = "Trial"
TARGET_KIND = "Target"


class Sweep(Base):
    """A µP sweep (contract/sweep.py). Its trials and target are ordinary jobs whose `parent` is this sweep's
    resource name, found again by their deterministic names; the row holds only what no child records: the
    request, the choice once made, and the sweep's own state."""

    __tablename__ = "sweeps"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True)
    spec: Mapped[dict[str, Any]]  # contract.sweep.SweepSpec.to_dict()
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(String(64), default="")
    state_message: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(128), default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The chosen point, once every trial ended: {"trial": index, "learning_rate", "weight_decay",
    # "hyperparameters": {field: value}, "objective"}; None before.
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    create_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    end_time: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (Index("ix_sweeps_create_time_name", "create_time", "name"),)

    @property
    def resource_name(self) -> str:
        return f"sweeps/{self.name}"


class ApiToken(Base):
    """A user's bearer token, kept only as its SHA-256."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    create_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ServerSecret(Base):
    """Secrets of the control plane itself, shared by every replica through the database (for example the
    key that derives each job's rank credentials)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
