"""The engine and sessions for either database, and schema migration at start-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_READ_ONLY = "roundhouse_read_only"


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
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


class Database:
    """One engine and its session factory. `session()` commits on success and rolls back on error."""

    def __init__(self, url: str, engine: Engine | None = None):
        self.url = url
        self.engine = engine or _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{_READ_ONLY: True}),
                                           expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read-write transaction."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads (on SQLite it does not wait for the write lock)."""
        with self._read_sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(db: Database) -> None:
    """Brings the schema to the newest migration (idempotent; run by every server start)."""
    command.upgrade(alembic_config(db.engine), "head")
