"""Durable state: SQLAlchemy models, the engine for SQLite or PostgreSQL, and Alembic migrations."""

from orchestrator.store.db import Database, migrate
from orchestrator.store.job_writer import NameTaken, NewJob
from orchestrator.store.models import (
    JOB_KIND, TARGET_KIND, TRIAL_KIND, ApiToken, Attempt, AttemptState, Checkpoint, Event, Job, JobLabel, JobState, Metric,
    RankStatus, ServerSecret, Sweep, SweepState, utcnow,
)

__all__ = [
    "ApiToken", "Attempt", "AttemptState", "Checkpoint", "Database", "Event", "Job", "JobLabel", "JobState",
    "JOB_KIND", "Metric", "NameTaken", "NewJob", "RankStatus", "ServerSecret", "Sweep", "SweepState", "TARGET_KIND",
    "TRIAL_KIND", "migrate", "utcnow",
]
