"""The store on both databases: migrations, the state machine, and events written with their change."""

from __future__ import annotations

import uuid
from concurrent.futures import Future

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from contract.spec import parse_spec
from orchestrator.lifecycle import IllegalTransition, transition
from orchestrator.service.jobs import new_job
from orchestrator.store.job_writer import JobWriter, NameTaken
from orchestrator.store import Database, Event, Job, JobLabel, JobState, migrate
from orchestrator.store.models import Base


def make_job(name: str = "j1", **labels: str) -> Job:
    return Job(name=name, uid=str(uuid.uuid4()), spec={"name": name}, state=JobState.QUEUED, total_steps=10,
               labels=[JobLabel(key=k, value=v) for k, v in labels.items()], attempts=[])


def test_migrations_create_exactly_the_models_schema(db):
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    tables = set(inspect(db.engine).get_table_names())
    assert {"jobs", "attempts", "events", "metrics", "rank_status", "checkpoints", "api_tokens"} <= tables


def test_migrate_is_idempotent(db):
    migrate(db)  # a second server start on the same database
    with db.read() as session:
        assert session.scalars(select(Job)).all() == []


def test_transition_writes_its_event_in_the_same_transaction(db):
    with db.session() as session:
        session.add(make_job())
    with db.session() as session:
        transition(session, session.get(Job, "j1"), JobState.LAUNCHING, "AttemptCreated", "attempt 1", attempt=1)
    with db.read() as session:
        job = session.get(Job, "j1")
        events = session.scalars(select(Event).where(Event.job_name == "j1")).all()
        assert job.state == JobState.LAUNCHING
        assert [(e.from_state, e.to_state, e.reason, e.attempt) for e in events] == [
            ("QUEUED", "LAUNCHING", "AttemptCreated", 1)]


def test_rolled_back_transition_leaves_neither_state_nor_event(db):
    with db.session() as session:
        session.add(make_job())
    with pytest.raises(RuntimeError):
        with db.session() as session:
            transition(session, session.get(Job, "j1"), JobState.LAUNCHING, "AttemptCreated")
            raise RuntimeError("crash before commit")
    with db.read() as session:
        assert session.get(Job, "j1").state == JobState.QUEUED
        assert session.scalars(select(Event)).all() == []


@pytest.mark.parametrize(("start", "target"), [
    (JobState.QUEUED, JobState.RUNNING),
    (JobState.SUCCEEDED, JobState.RUNNING),
    (JobState.CANCELLED, JobState.QUEUED),
    (JobState.FAILED, JobState.RESTARTING),
])
def test_illegal_transitions_are_refused(db, start, target):
    job = make_job()
    job.state = start
    with db.session() as session:
        session.add(job)
    with pytest.raises(IllegalTransition):
        with db.session() as session:
            transition(session, session.get(Job, "j1"), target, "Test")


def test_terminal_transition_sets_end_time_and_running_sets_start_time(db):
    with db.session() as session:
        session.add(make_job())
    with db.session() as session:
        job = session.get(Job, "j1")
        transition(session, job, JobState.LAUNCHING, "A")
        transition(session, job, JobState.RUNNING, "B")
        transition(session, job, JobState.SUCCEEDED, "C")
    with db.read() as session:
        job = session.get(Job, "j1")
        assert job.start_time is not None and job.end_time is not None and job.start_time <= job.end_time


def test_deleting_a_job_removes_its_labels_and_events(db):
    with db.session() as session:
        session.add(make_job(team="a"))
    with db.session() as session:
        transition(session, session.get(Job, "j1"), JobState.CANCELLED, "X")
    with db.session() as session:
        session.delete(session.get(Job, "j1"))
    with db.read() as session:
        assert session.scalars(select(JobLabel)).all() == []
        assert session.scalars(select(Event)).all() == []


def test_migration_0002_gives_existing_jobs_zero_counts_and_checkpoint_step(db_url):
    from alembic import command
    from sqlalchemy import text

    from orchestrator.store.db import alembic_config

    database = Database(db_url)
    try:
        command.upgrade(alembic_config(database.engine), "0001")
        with database.engine.begin() as conn:  # a job written by the previous version
            conn.execute(text(
                "INSERT INTO jobs (name, uid, spec, state, state_reason, state_message, owner, total_steps, "
                "current_step, tokens_per_second, max_restarts, restart_count, cancel_requested, create_time, "
                "update_time) VALUES ('old', 'u-1', '{}', 'RUNNING', '', '', '', 10, 3, 0, 2, 1, false, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
        migrate(database)
        with database.read() as session:
            job = session.get(Job, "old")
            counts = (job.restart_count, job.hang_restart_count, job.preemption_count, job.checkpoint_step)
            assert counts == (1, 0, 0, 0)
        command.downgrade(alembic_config(database.engine), "0001")  # and back
        assert "checkpoint_step" not in {c["name"] for c in inspect(database.engine).get_columns("jobs")}
    finally:
        database.dispose()


def test_migration_0003_makes_existing_jobs_plain_jobs_without_a_parent_and_no_attempt_stopping(db_url):
    from alembic import command
    from sqlalchemy import text

    from orchestrator.store import Attempt
    from orchestrator.store.db import alembic_config

    database = Database(db_url)
    try:
        command.upgrade(alembic_config(database.engine), "0002")
        with database.engine.begin() as conn:  # a job and its attempt written by the previous version
            conn.execute(text(
                "INSERT INTO jobs (name, uid, spec, state, state_reason, state_message, owner, total_steps, "
                "current_step, tokens_per_second, max_restarts, restart_count, cancel_requested, create_time, "
                "update_time) VALUES ('old', 'u-1', '{}', 'RUNNING', '', '', '', 10, 3, 0, 2, 1, false, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
            conn.execute(text(
                "INSERT INTO attempts (job_name, number, state, tp, pp, dp, world_size, start_step, launch_info, "
                "create_time, end_reason) VALUES ('old', 1, 'RUNNING', 1, 1, 1, 1, 0, '{}', "
                "'2026-01-01 00:00:00', '')"))
        migrate(database)
        with database.read() as session:
            job = session.get(Job, "old")
            assert (job.kind, job.parent) == ("Job", None)
            attempt = session.scalars(select(Attempt)).one()
            assert (attempt.stop_deadline, attempt.stop_outcome, attempt.stopping) == (None, None, False)
        with database.session() as session:  # a parent's child: the owner finds it by its resource name
            child = make_job("trial-1")
            child.kind, child.parent = "Job", "sweeps/lr"
            session.add(child)
        with database.read() as session:
            assert session.scalars(select(Job.name).where(Job.parent == "sweeps/lr")).all() == ["trial-1"]
        command.downgrade(alembic_config(database.engine), "0002")  # and back
        assert "parent" not in {c["name"] for c in inspect(database.engine).get_columns("jobs")}
        assert "stop_deadline" not in {c["name"] for c in inspect(database.engine).get_columns("attempts")}
    finally:
        database.dispose()


def test_group_commit_writes_a_batch_and_refuses_names_taken_before_or_within_it(db):
    """The job writer's one transaction for many creations (orchestrator/store/job_writer.py): every new name
    written with its labels and event; a name already stored, or met earlier in the same batch, refused."""
    db.create_job(new_job(parse_spec({"name": "old"}), "alice"))
    names = ["a", "b", "old", "a", "c"]
    batch = [(new_job(parse_spec({"name": n, "labels": {"n": n}}), "alice"), Future()) for n in names]
    writer = JobWriter(db)
    try:
        writer._commit(batch)  # the step the writer's thread takes, on one batch as it would gather it
    finally:
        writer.close()
    outcomes = [type(f.exception()).__name__ if f.exception() else "written" for _, f in batch]
    assert outcomes == ["written", "written", NameTaken.__name__, NameTaken.__name__, "written"]
    with db.read() as session:
        assert sorted(session.scalars(select(Job.name))) == ["a", "b", "c", "old"]
        assert sorted(session.scalars(select(JobLabel.value))) == ["a", "b", "c"]
        assert sorted(session.scalars(select(Event.job_name))) == ["a", "b", "c", "old"]
