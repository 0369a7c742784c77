"""What the streaming calls (WatchJob, StreamLogs, WatchSweep) share on the grpc.aio server.

A stream is a coroutine on the server's event loop, not a thread: it holds no worker while it waits
between polls. What blocks (database reads, reading a log) runs on the stream executors, which unary
calls never use (they run on the server's own pool), so no number of open streams can starve them. Each
user may hold at most `per_user` streams open at once; the next is refused RESOURCE_EXHAUSTED, naming the
limit."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
from sqlalchemy import func, select

from orchestrator.auth import Principal, UserTokens, bearer_token
from orchestrator.store import Database, Event, Job, Metric

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS_PER_USER = 32

T = TypeVar("T")


class Streams:
    """Open streams by user, and where a stream's blocking work runs. Used only on the event loop's thread."""

    def __init__(self, users: UserTokens, executor: Executor, log_executor: Executor | None = None,
                 per_user: int = DEFAULT_MAX_STREAMS_PER_USER):
        self.users = users
        self.executor = executor
        # Reading logs (a launcher may wait in a stream of its own: Kubernetes): apart, so that it never
        # delays the watches' database reads.
        self.log_executor = log_executor or executor
        self.per_user = per_user
        self._open: Counter[str] = Counter()

    async def run(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on the stream executor; the stream waits for it without holding the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(function, *args))

    async def run_log(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on the log executor."""
        return await asyncio.get_running_loop().run_in_executor(self.log_executor, functools.partial(function, *args))

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """Who calls (the interceptor already refused a caller without a valid token; a token revoked since
        is refused here)."""
        token = bearer_token(context.invocation_metadata())
        principal = self.users.cached(token) or await self.run(self.users.lookup, token)
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")
        return principal

    @asynccontextmanager
    async def slot(self, principal: Principal, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Holds one of the user's streams for the block; past the limit the call ends RESOURCE_EXHAUSTED."""
        if self._open[principal.user] >= self.per_user:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{principal.user} already has {self._open[principal.user]} streams open: at most "
                                f"{self.per_user} per user (roundhouse serve --max-streams-per-user); close one "
                                f"(a watch, a followed log) first")
        self._open[principal.user] += 1
        try:
            yield
        finally:
            self._open[principal.user] -= 1
            if not self._open[principal.user]:
                del self._open[principal.user]

    def open_streams(self, user: str) -> int:
        return self._open[user]


class JobChanges:
    """Tells WatchJob streams when their job may have changed, from one poll of the store for all of them:
    a few cheap queries a tick however many streams are open (the newest event and metric ids, the watched
    jobs' versions; which watched jobs have rows past the ids seen last, only when those moved). A stream
    then reads its job in full only when told, or every `full_read_seconds` in any case (a row committed
    out of id order on PostgreSQL is not missed for long)."""

    def __init__(self, db: Database, streams: Streams, interval_seconds: float, full_read_seconds: float = 30.0):
        self.db = db
        self.streams = streams
        self.interval_seconds = interval_seconds
        self.full_read_seconds = full_read_seconds
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._versions: dict[str, tuple] = {}
        self._seen: tuple[int, int] | None = None  # the newest event and metric ids at the last poll
        self._task: asyncio.Task | None = None

    @asynccontextmanager
    async def subscribe(self, name: str) -> AsyncIterator[asyncio.Event]:
        """An event set when the job may have changed (set at first: read it now)."""
        changed = asyncio.Event()
        changed.set()
        self._waiting.setdefault(name, set()).add(changed)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            yield changed
        finally:
            waiting = self._waiting[name]
            waiting.discard(changed)
            if not waiting:
                del self._waiting[name]

    async def wait(self, changed: asyncio.Event) -> None:
        """Until the job may have changed, or for at most full_read_seconds."""
        try:
            await asyncio.wait_for(changed.wait(), self.full_read_seconds)
        except TimeoutError:
            pass
        changed.clear()

    async def _run(self) -> None:
        while self._waiting:
            await asyncio.sleep(self.interval_seconds)
            names = list(self._waiting)
            if not names:
                break
            try:
                changed = await self.streams.run(self._poll, names)
            except Exception:  # a database that went away: the streams' own full reads say so
                log.exception("polling the watched jobs failed")
                continue
            for name in changed:
                for event in self._waiting.get(name, ()):
                    event.set()
            for name in [n for n in self._versions if n not in self._waiting]:  # no longer watched
                del self._versions[name]

    def _poll(self, names: list[str]) -> set[str]:
        with self.db.read() as session:
            seen = (session.scalar(select(func.max(Event.id))) or 0, session.scalar(select(func.max(Metric.id))) or 0)
            changed = set()
            for name, *version in session.execute(select(Job.name, Job.update_time, Job.current_step, Job.state)
                                                  .where(Job.name.in_(names))):
                if self._versions.get(name) != tuple(version):
                    self._versions[name] = tuple(version)
                    changed.add(name)
            if self._seen is not None:
                for table, before, now in ((Event, self._seen[0], seen[0]), (Metric, self._seen[1], seen[1])):
                    if now != before:
                        changed.update(session.scalars(select(table.job_name).distinct()
                                                       .where(table.id > before, table.job_name.in_(names))))
            self._seen = seen
            return changed
