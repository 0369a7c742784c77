"""Durable state: SQLAlchemy models, the engine for SQLite or PostgreSQL, and Alembic migrations."""

from orchestrator.store.db import Database, migrate
from orchestrator.store.job_writer import NameTaken, NewJob
from orchestrator.store.models import (
    ApiToken, Attempt, AttemptState, Checkpoint, Event, Job, JobLabel, JobState, Metric, RankStatus, ServerSecret, utcnow,
)

__all__ = [
    "ApiToken", "Attempt", "AttemptState", "Checkpoint", "Database", "Event", "Job", "JobLabel", "JobState",
    "Metric", "NameTaken", "NewJob", "RankStatus", "ServerSecret", "migrate", "utcnow",
]
