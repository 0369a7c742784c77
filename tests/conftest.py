"""Shared fixtures: a database of each kind (SQLite file; a fresh schema on the PostgreSQL server), and a
control plane running in this process on free ports."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from orchestrator.config import token_file
from orchestrator.controller import ReconcilerSettings
from orchestrator.server import ControlPlane, ServerSettings
from orchestrator.store import Database, migrate
from roundhouse.v1 import job_service_pb2_grpc
from tests.support.processes import become_subreaper, descendants, kill_all, started_since

# Orphaned grandchildren (the ranks of a control plane started as a subprocess) are re-parented to this
# process rather than to init, so the sweep below still finds them.
become_subreaper()


@pytest.fixture(autouse=True)
def _kill_what_the_test_started() -> Iterator[None]:
    """Kills every process this test started (each one's whole process group), whatever the outcome.

    Runs after the wider-scoped fixtures have started theirs (pytest sets those up first), so a module's
    server survives its tests while a failed test's ranks do not outlive it. What a process of theirs starts
    during the test (a module's browser opening a renderer) is theirs, not the test's, and is left alone."""
    before = descendants()
    yield
    kill_all(started_since(before))

# The project's machines and CI run PostgreSQL here (trust auth, database "test").
POSTGRES_URL = os.environ.get("ROUNDHOUSE_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: an SQLite file, or a new schema on PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'roundhouse.db'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def db(db_url) -> Iterator[Database]:
    """The store over a fresh, migrated database of each kind."""
    database = Database(db_url)
    migrate(database)
    yield database
    database.dispose()


@contextmanager
def postgres_schema() -> Iterator[str]:
    """The URL of a new, empty schema on the test PostgreSQL server, dropped at the end."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


class Client:
    """The JobService stub with the admin token the control plane wrote at first start."""

    def __init__(self, address: str, token: str):
        self.address = address
        self.token = token
        self.channel = grpc.insecure_channel(address)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")]

    def close(self) -> None:
        self.channel.close()


def processes_of(job: str) -> list[int]:
    """Every live process on this machine that belongs to the job (its ranks carry ROUNDHOUSE_JOB)."""
    marker = f"ROUNDHOUSE_JOB=jobs/{job}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes() and (entry / "stat").read_text().split()[2] != "Z":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# Tests run tiny ranks, more of them than the machine has cores (8 on 2): the local launcher's default cap
# (the machine's cores) is lifted to this.
TEST_MAX_RANKS = 16


def start_plane(home: Path, db_url: str | None, reconcile: bool, allow_test_hooks: bool = True,
                data_roots: tuple[Path, ...] = ()) -> ControlPlane:
    """A control plane on free ports; started for tests (test hooks allowed) unless told otherwise."""
    plane = ControlPlane(ServerSettings(home=home, db_url=db_url, grpc_port=0, http_port=0, reconcile=reconcile,
                                        allow_test_hooks=allow_test_hooks, data_roots=data_roots,
                                        max_ranks=TEST_MAX_RANKS,
                                        reconciler=ReconcilerSettings(interval_seconds=0.2,
                                                                      restart_backoff_seconds=0.2,
                                                                      stop_grace_seconds=5)))
    plane.start()
    return plane


@pytest.fixture
def api_plane(db_url, tmp_path) -> Iterator[ControlPlane]:
    """A control plane that records jobs but launches nothing (the reconciler is off)."""
    plane = start_plane(tmp_path / "home", db_url, reconcile=False)
    yield plane
    plane.stop()


@pytest.fixture
def client(api_plane) -> Iterator[Client]:
    c = Client(api_plane.grpc_address, token_file(api_plane.settings.home).read_text().strip())
    yield c
    c.close()
