"""The engine and sessions for either database, and schema migration at start-up."""

from __future__ import annotations

from collections.abc import Iterator
import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.config import PRIVATE_FILE_MODE, private_opener, tighten
from orchestrator.store.job_writer import JobWriter, NewJob

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_READ_ONLY = "roundhouse_read_only"


def _private_sqlite_files(url: str) -> None:
    """The SQLite database file (it holds the rank credential key and every spec) created for this user alone
    (0600) before SQLite opens it, and an existing one tightened with its -wal and -shm; SQLite creates those
    two with the database file's mode."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("uri"):
        return  # in memory, or a URI filename: nothing of ours on disk to guard
    path = Path(database)
    if not path.parent.is_dir():
        return  # SQLite refuses to open it, with its own error
    for existing in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if existing.exists():
            tighten(existing, PRIVATE_FILE_MODE, warn=True)
    if not path.exists():  # an empty file is a new database to SQLite
        os.close(private_opener(str(path), os.O_RDWR | os.O_CREAT))


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _private_sqlite_files(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=8, max_overflow=16)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            # Let SQLAlchemy's "begin" hook below open transactions, not the sqlite3 module.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # WAL: readers never block the writer. synchronous=FULL: a commit is on disk when it returns.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            # Writers take the write lock up front: a deferred transaction that upgrades later can fail
            # with "database is locked" without waiting for busy_timeout. Readers (WAL) need no lock.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)


# SQLite's OperationalError also stands for mistakes in a statement (no such table, a syntax error): only these
# say the database cannot be reached or written now.
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error",
                       "database or disk is full")


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) says the database cannot be reached now (a
    PostgreSQL restarting, a dropped connection, no pooled connection free in time): a retryable condition,
    not a bug."""
    for _ in range(8):  # the error and what it was raised from, a few deep (a chain can loop)
        if error is None:
            return False
        if isinstance(error, (exc.DisconnectionError, exc.TimeoutError, exc.InterfaceError)):
            return True
        if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, exc.OperationalError):
            if type(error.orig).__module__ != "sqlite3":
                return True
            return any(text in str(error.orig).lower() for text in _SQLITE_UNAVAILABLE)
        error = error.__cause__ or error.__context__
    return False


class Database:
    """One engine and its session factory. `session()` commits on success and rolls back on error."""

    def __init__(self, url: str, engine: Engine | None = None):
        self.url = url
        self.engine = engine or _make_engine(url)
        # SQLite has one writer at a time; waiting writers poll with growing sleeps (busy_timeout), which
        # makes long tails. Writers of this process queue on a lock instead and never meet the busy handler.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{_READ_ONLY: True}),
                                           expire_on_commit=False)
        self._job_writer: JobWriter | None = None
        self._writer_lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read-write transaction."""
        with self._write_lock, self._sessions.begin() as session:
            yield session

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A read-write transaction on a Core connection (for bulk statements on hot paths)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads (on SQLite it does not wait for the write lock)."""
        with self._read_sessions.begin() as session:
            yield session

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A transaction that only reads, on a Core connection (for hot paths; never waits for the write lock)."""
        with self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn, conn.begin():
            yield conn

    def create_job(self, new_job: NewJob) -> None:
        """Inserts a job with its labels and first event (group-committed with concurrent creations);
        raises NameTaken if the name is in use."""
        with self._writer_lock:
            if self._job_writer is None:
                self._job_writer = JobWriter(self)
        self._job_writer.create(new_job)

    def dispose(self) -> None:
        if self._job_writer is not None:
            self._job_writer.close()
        self.engine.dispose()


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(db: Database) -> None:
    """Brings the schema to the newest migration (idempotent; run by every server start)."""
    command.upgrade(alembic_config(db.engine), "head")
