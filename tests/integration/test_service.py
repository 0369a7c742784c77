"""The service layer on both databases: the one authorization rule (who may read, submit and cancel what,
and which rank may report for which job), and the queries the gRPC API and the dashboard share."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import event, func, select

from orchestrator.auth import Principal, job_token
from orchestrator.launcher import AttemptRef
from orchestrator.launcher.registry import create_launcher, launcher_factory, launcher_names
from orchestrator.service import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from orchestrator.service import jobs
from orchestrator.service.access import Action, allowed, authorize, rank_may_report
from orchestrator.store import (Attempt, AttemptState, Database, Event, Job, JobLabel, JobState, migrate,
                                utcnow)

ADMIN = Principal("root", "admin")
ALICE = Principal("alice", "user")
BOB = Principal("bob", "user")


@pytest.fixture
def db(db_url):
    database = Database(db_url)
    migrate(database)
    with database.session() as session:
        for name, owner, state in (("alices", "alice", JobState.RUNNING), ("bobs", "bob", JobState.QUEUED),
                                   ("ended", "alice", JobState.SUCCEEDED)):
            now = utcnow()
            session.add(Job(name=name, uid=str(uuid.uuid4()), spec={"name": name}, state=state, owner=owner,
                            total_steps=10, create_time=now, update_time=now))
    yield database
    database.dispose()


def events_of(db: Database, name: str) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Event).where(Event.job_name == name))


# -- the rule ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("principal", "may_cancel"), [(ADMIN, {"alices", "bobs"}), (ALICE, {"alices"}),
                                                       (BOB, {"bobs"}), (None, set())],
                         ids=["admin", "owner-alice", "owner-bob", "anonymous"])
def test_admins_cancel_any_job_users_their_own_and_everyone_known_reads_and_submits(db, principal, may_cancel):
    with db.read() as session:
        for name in ("alices", "bobs"):
            job = session.get(Job, name)
            assert allowed(principal, Action.CANCEL, job) is (name in may_cancel)
            assert allowed(principal, Action.READ, job) is (principal is not None)
        assert allowed(principal, Action.SUBMIT) is (principal is not None)


def test_a_refused_cancel_raises_the_reason_and_writes_nothing(db):
    with db.session() as session, pytest.raises(PermissionDenied, match="bob may not cancel jobs/alices "
                                                                        r"\(only its owner alice or an admin\)"):
        jobs.cancel_job(session, BOB, "alices")
    with db.session() as session, pytest.raises(Unauthenticated):
        jobs.cancel_job(session, None, "jobs/alices")
    with db.read() as session:
        assert not session.get(Job, "alices").cancel_requested
    assert events_of(db, "alices") == 0


def test_an_owner_and_an_admin_may_cancel_and_the_request_is_recorded_once(db):
    with db.session() as session:
        assert jobs.cancel_job(session, ALICE, "alices").cancel_requested
    with db.session() as session:
        jobs.cancel_job(session, ADMIN, "jobs/alices")  # asked again: already requested, no second event
        jobs.cancel_job(session, ADMIN, "bobs")
    with db.read() as session:
        events = session.scalars(select(Event).order_by(Event.id)).all()
        assert [(e.job_name, e.reason, e.message) for e in events] == [
            ("alices", "CancelRequested", "cancel requested by alice"),
            ("bobs", "CancelRequested", "cancel requested by root")]
        assert not jobs.may_cancel(ALICE, session.get(Job, "bobs"))


def test_a_finished_job_cannot_be_cancelled_even_by_an_admin(db):
    with db.session() as session, pytest.raises(FailedPrecondition, match="already ended"):
        jobs.cancel_job(session, ADMIN, "ended")
    with db.read() as session:
        assert not jobs.may_cancel(ADMIN, session.get(Job, "ended"))


def test_reading_needs_a_principal(db):
    with db.read() as session:
        for read in (lambda: jobs.get_job(session, None, "alices"), lambda: jobs.list_jobs(session, None),
                     lambda: jobs.list_checkpoints(session, None, "alices"),
                     lambda: jobs.log_source(session, None, "alices", 0)):
            with pytest.raises(Unauthenticated):
                read()
    with pytest.raises(Unauthenticated):
        authorize(None, Action.SUBMIT)


def test_a_rank_may_report_only_with_its_own_jobs_and_attempts_credential(db):
    key = b"k" * 32
    with db.read() as session:
        job, other = session.get(Job, "alices"), session.get(Job, "bobs")
        token = job_token(key, job.uid, 2)
        assert rank_may_report(key, job, 2, token)
        assert not rank_may_report(key, job, 1, token)  # another attempt
        assert not rank_may_report(key, other, 2, token)  # another job
        assert not rank_may_report(key, None, 2, token)  # no such job
        assert not rank_may_report(key, job, 2, None)
        assert not rank_may_report(b"x" * 32, job, 2, token)  # another server's key


# -- queries -----------------------------------------------------------------------------------------------

def test_names_are_checked_and_unknown_jobs_are_not_found(db):
    with db.read() as session:
        assert jobs.get_job(session, BOB, "jobs/alices").name == "alices"
        with pytest.raises(InvalidArgument) as bad:
            jobs.get_job(session, BOB, "projects/x/jobs/Bad", field="parent")
        assert bad.value.field == "parent"
        with pytest.raises(NotFound, match="job jobs/nope not found"):
            jobs.get_job(session, BOB, "nope")


def test_list_filters_pages_and_refuses_a_token_from_another_filter(db):
    with db.read() as session:
        first = jobs.list_jobs(session, BOB, page_size=2)
        assert len(first.items) == 2 and first.next_page_token
        rest = jobs.list_jobs(session, BOB, page_size=2, page_token=first.next_page_token)
        assert len(rest.items) == 1 and rest.next_page_token == ""
        assert {j.name for j in first.items + rest.items} == {"alices", "bobs", "ended"}
        assert [j.name for j in jobs.list_jobs(session, BOB, states=["SUCCEEDED"]).items] == ["ended"]
        for bad, field in ((dict(page_size=-1), "page_size"), (dict(states=["NOPE"]), "states"),
                           (dict(page_size=2, states=["QUEUED"], page_token=first.next_page_token), "page_token")):
            with pytest.raises(InvalidArgument) as refused:
                jobs.list_jobs(session, BOB, **bad)
            assert refused.value.field == field


def test_a_job_is_read_with_its_attempts_in_one_statement_and_its_labels_only_when_asked(db):
    """GetJob's and ListJobs' reads: what they answer needs no label rows (the spec has the labels)."""
    with db.session() as session:
        job = session.get(Job, "alices")
        for number in (2, 1):  # stored out of order: the relationship's order must hold in the joined read
            job.attempts.append(Attempt(job_name="alices", number=number, state=AttemptState.FAILED, tp=1, pp=1,
                                        dp=1, world_size=1))
        job.labels.append(JobLabel(job_name="alices", key="team", value="infra"))
    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT"):  # not SQLite's BEGIN
            statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        with db.read() as session:
            statements.clear()
            job = jobs.get_job(session, BOB, "jobs/alices", with_labels=False)
            assert [a.number for a in job.attempts] == [1, 2]
            assert len(statements) == 1, statements  # the job and its attempts together
            assert {label.key: label.value for label in job.labels} == {"team": "infra"}  # read when asked
        with db.read() as session:
            statements.clear()
            job = jobs.get_job(session, BOB, "jobs/alices")
            assert len(statements) == 2, statements  # the job with its attempts, then its labels
            assert [a.number for a in job.attempts] == [1, 2]
            assert {label.key: label.value for label in job.labels} == {"team": "infra"}
            assert len(statements) == 2
        with db.read() as session:
            statements.clear()
            listed = jobs.list_jobs(session, BOB, with_labels=False).items
            assert len(statements) == 2, statements  # the page, then its jobs' attempts
            assert [a.number for a in next(j for j in listed if j.name == "alices").attempts] == [1, 2]
    finally:
        event.remove(db.engine, "before_cursor_execute", count)


def test_a_log_is_read_from_a_launched_attempt_and_a_rank_it_has(db):
    with db.session() as session:
        job = session.get(Job, "alices")
        job.attempts.append(Attempt(job_name="alices", number=1, state=AttemptState.RUNNING, tp=1, pp=1, dp=2,
                                    world_size=2, launch_info={"pids": [1, 2]}))
    with db.read() as session:
        assert jobs.log_source(session, BOB, "alices", rank=1) == AttemptRef("alices", 1, {"pids": [1, 2]})
        for kwargs, field in ((dict(rank=2), "rank"), (dict(rank=0, attempt=3), "attempt")):
            with pytest.raises(InvalidArgument) as refused:
                jobs.log_source(session, BOB, "alices", **kwargs)
            assert refused.value.field == field
        with pytest.raises(FailedPrecondition, match="has not launched yet"):
            jobs.log_source(session, BOB, "bobs", rank=0)
        assert not jobs.attempt_ended(session, AttemptRef("alices", 1))


# -- the launcher registry ---------------------------------------------------------------------------------

def test_launchers_come_from_the_entry_points(tmp_path):
    from orchestrator.launcher.local import LocalLauncher
    from orchestrator.server import ServerSettings

    assert {"local", "kubernetes"} <= set(launcher_names())
    launcher = create_launcher(ServerSettings(home=tmp_path, max_ranks=3))
    assert isinstance(launcher, LocalLauncher)
    assert launcher.runs_dir == tmp_path / "runs" and launcher.capacity() == 3
    with pytest.raises(ValueError, match=r"unknown launcher 'slurm' \(installed: .*kubernetes, local"):
        launcher_factory("slurm")
    with pytest.raises(ValueError, match="takes no options, not image"):
        create_launcher(ServerSettings(home=tmp_path, launcher_options={"image": "x"}))
    # Refused before any connection to a cluster is tried.
    with pytest.raises(ValueError, match="unknown Kubernetes launcher option.*imag"):
        create_launcher(ServerSettings(home=tmp_path, launcher="kubernetes", launcher_options={"imag": "x"}))
