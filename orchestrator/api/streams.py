"""What the streaming calls (WatchJob, StreamLogs, WatchSweep) share on the grpc.aio server.

A stream is a coroutine on the server's event loop, not a thread: it holds no worker while it waits
between polls. What blocks (database reads, reading a log) runs on the stream executors, which unary
calls never use (they run on the server's own pool), so no number of open streams can starve them. Each
user may hold at most `per_user` streams open at once; the next is refused RESOURCE_EXHAUSTED, naming the
limit."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from orchestrator.auth import Principal, UserTokens, bearer_token

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
        principal = await self.run(self.users.lookup, bearer_token(context.invocation_metadata()))
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
