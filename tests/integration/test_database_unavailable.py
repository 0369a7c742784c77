"""A database that cannot be reached (a PostgreSQL restarting, an SQLite file that cannot be opened) is a
retryable condition: calls answer UNAVAILABLE with an error id that the server's log has, never INTERNAL or
UNKNOWN, including calls whose token the auth interceptor must look up; once the database is back, calls
succeed again. On both databases, with the engine's new connections refused and its pool emptied."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from sqlalchemy import event, exc, text

from orchestrator.auth import create_token
from orchestrator.server import ControlPlane
from orchestrator.store.db import database_unavailable
from roundhouse.v1 import job_service_pb2 as js

from tests.integration.test_api import create, spec

ERROR_ID = re.compile(r"\(id ([0-9a-f]{12})\)")


@contextmanager
def database_down(plane: ControlPlane) -> Iterator[None]:
    """Every new connection is refused as the driver refuses it when the server is down, and the pooled ones
    are dropped; afterwards connections are made again."""
    engine = plane.db.engine
    dbapi = engine.dialect.loaded_dbapi
    message = ("unable to open database file" if engine.dialect.name == "sqlite"
               else "connection failed: connection to server at 127.0.0.1, port 5432 failed: Connection refused")

    def refuse(*_args, **_kwargs):
        raise dbapi.OperationalError(message)

    event.listen(engine, "do_connect", refuse)
    engine.dispose()
    try:
        yield
    finally:
        event.remove(engine, "do_connect", refuse)


def unavailable_id(error: grpc.RpcError, caplog) -> str:
    """The error id of an UNAVAILABLE answer, checked against the server's log line."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    match = ERROR_ID.search(error.details())
    assert match, error.details()
    assert "the database is unavailable" in error.details()
    logged = [r.getMessage() for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and "database unavailable" in logged[0], logged
    return match.group(1)


def test_calls_while_the_database_is_down_are_unavailable_with_an_id_then_succeed(client, api_plane, caplog):
    caplog.set_level(logging.WARNING)
    api_plane.users.CACHE_SECONDS = 3600  # the admin token stays known: its calls reach their handlers
    create(client, "before")
    fresh = create_token(api_plane.db, "bob", "user")  # never used: the auth interceptor must look it up
    fresh_metadata = [("authorization", f"Bearer {fresh}")]

    ids = set()
    with database_down(api_plane):
        calls = {
            "GetJob": lambda md: client.jobs.GetJob(js.GetJobRequest(name="jobs/before"), metadata=md),
            "ListJobs": lambda md: client.jobs.ListJobs(js.ListJobsRequest(), metadata=md),
            "CreateJob": lambda md: client.jobs.CreateJob(js.CreateJobRequest(spec=spec("during")), metadata=md),
            "WatchJob": lambda md: list(client.jobs.WatchJob(js.WatchJobRequest(name="jobs/before"), metadata=md)),
        }
        for name, call in calls.items():
            for metadata in (client.metadata, fresh_metadata):  # handler's read; the interceptor's lookup
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                ids.add(unavailable_id(info.value, caplog))
    assert len(ids) == 2 * len(calls)  # one id per failed call

    # The database is back: the same calls succeed, with the same tokens.
    assert client.jobs.GetJob(js.GetJobRequest(name="jobs/before"), metadata=client.metadata).name == "jobs/before"
    assert [j.name for j in client.jobs.ListJobs(js.ListJobsRequest(), metadata=fresh_metadata).jobs] == \
        ["jobs/before"]


def test_a_mistake_in_a_statement_is_not_taken_for_an_unreachable_database(db):
    """SQLite says "no such table" with the same exception class as "unable to open database file"
    (OperationalError); PostgreSQL with a ProgrammingError."""
    with pytest.raises(exc.DBAPIError) as info, db.read_connection() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not database_unavailable(info.value)
    assert not database_unavailable(ValueError("not a database error"))
