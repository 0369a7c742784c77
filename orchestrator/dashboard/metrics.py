"""Prometheus metrics of the control plane, served at /metrics.

Two kinds: what the database knows (jobs by state, restarts), so every replica reports the same; and what
this process saw: API calls and their latencies, recorded by a gRPC interceptor, and checkpoint commits,
counted as the TrainerService records them. A commit's row may later be deleted by the job's retention
policy, so the rows are no counter; like every process counter, this one starts at 0 when the process does
(Prometheus' rate() and increase() handle that) and is summed over replicas. Each ControlPlane has its own
registry, so several in one process (tests) don't clash.

A scrape reads no table: the database figures are one grouped query over the jobs, run by a thread of their
own every `refresh_seconds` (`start()`), and a scrape serves the newest result (its age is
`roundhouse_metrics_refreshed_timestamp_seconds`). Restarts are the sum of the jobs' restart counters (crash,
hang and preemption: each move to RESTARTING spends one), which never go down, and jobs are never deleted, so
the counter only grows."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from orchestrator.store import Database, Job, JobState

log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS = 10.0


class ServiceMetrics:
    def __init__(self, db: Database, refresh_seconds: float = DEFAULT_REFRESH_SECONDS):
        self.registry = CollectorRegistry()
        self.database_figures = _DatabaseFigures(db, refresh_seconds)
        self.registry.register(self.database_figures)
        self.api_calls = Counter("roundhouse_api_calls", "gRPC calls handled, by method and status code",
                                 ["method", "code"], registry=self.registry)
        self.api_latency = Histogram("roundhouse_api_call_seconds", "gRPC call latency, by method",
                                     ["method"], registry=self.registry)
        self.checkpoint_commits = Counter("roundhouse_checkpoint_commits", "Checkpoints committed (reports "
                                          "recorded by this process; retries not counted)", registry=self.registry)
        self.interceptor = _ApiMetricsInterceptor(self)

    def start(self) -> None:
        """Reads the database figures now and then every refresh_seconds on a thread, until stop()."""
        self.database_figures.start()

    def stop(self) -> None:
        self.database_figures.stop()

    def refresh(self) -> None:
        """Reads the database figures now (what the thread does each time; tests call it to not wait)."""
        self.database_figures.refresh()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def checkpoint_committed(self) -> None:
        self.checkpoint_commits.inc()

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.api_calls.labels(method, code.name).inc()
        self.api_latency.labels(method).observe(seconds)


@dataclass(frozen=True)
class _Figures:
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    refreshed_at: float = 0.0  # Unix time; 0: never read yet


class _DatabaseFigures:
    """A collector of what the database knows, read on a thread of its own; a scrape serves the newest."""

    def __init__(self, db: Database, refresh_seconds: float):
        if refresh_seconds <= 0:
            raise ValueError(f"metrics refresh: must be positive seconds, got {refresh_seconds}")
        self.db = db
        self.refresh_seconds = refresh_seconds
        self._figures = _Figures()  # replaced whole, so a scrape on another thread sees one consistent read
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.refresh()
            except Exception:  # the database is away: keep serving the last figures (their age tells)
                log.warning("cannot refresh the database metrics", exc_info=True)
            self._stopping.wait(self.refresh_seconds)

    def refresh(self) -> None:
        restarted = Job.restart_count + Job.hang_restart_count + Job.preemption_count
        with self.db.read() as session:
            rows = session.execute(select(Job.state, func.count(), func.coalesce(func.sum(restarted), 0))
                                   .group_by(Job.state)).all()
        self._figures = _Figures({state: count for state, count, _ in rows}, sum(int(r) for _, _, r in rows),
                                 time.time())

    def collect(self):
        figures = self._figures
        jobs = GaugeMetricFamily("roundhouse_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], figures.jobs_by_state.get(state.value, 0))
        yield jobs
        yield CounterMetricFamily("roundhouse_job_restarts", "Restarts of jobs (transitions to RESTARTING)",
                                  value=figures.restarts)
        yield GaugeMetricFamily("roundhouse_metrics_refreshed_timestamp_seconds",
                                "When the job figures above were last read from the database (Unix time; 0: "
                                "not yet)", value=figures.refreshed_at)


class _ApiMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call and times it, by method and final status code (unary and server-streaming). On the
    grpc.aio server a handler is a coroutine (the streams) or a blocking function (run on the server's pool);
    each is wrapped in its own kind."""

    def __init__(self, metrics: ServiceMetrics):
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        record = self._metrics.record
        wrap = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
                else grpc.unary_unary_rpc_method_handler)
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

        if inspect.isasyncgenfunction(inner):
            async def call(request, context):
                start = time.perf_counter()
                try:
                    async for response in inner(request, context):
                        yield response
                except asyncio.CancelledError:  # the client went away
                    record(method, grpc.StatusCode.CANCELLED, time.perf_counter() - start)
                    raise
                except BaseException:  # AbortError among others
                    record(method, _code(context, grpc.StatusCode.UNKNOWN), time.perf_counter() - start)
                    raise
                record(method, _code(context, grpc.StatusCode.OK), time.perf_counter() - start)
        elif inspect.iscoroutinefunction(inner):
            async def call(request, context):
                start = time.perf_counter()
                try:
                    response = await inner(request, context)
                except BaseException:
                    record(method, _code(context, grpc.StatusCode.UNKNOWN), time.perf_counter() - start)
                    raise
                record(method, _code(context, grpc.StatusCode.OK), time.perf_counter() - start)
                return response
        elif handler.response_streaming:
            def call(request, context):
                context = _CodeKeeper(context)
                start = time.perf_counter()
                try:
                    yield from inner(request, context)
                except BaseException:
                    record(method, context.code or grpc.StatusCode.UNKNOWN, time.perf_counter() - start)
                    raise
                record(method, context.code or grpc.StatusCode.OK, time.perf_counter() - start)
        else:
            def call(request, context):
                context = _CodeKeeper(context)
                start = time.perf_counter()
                try:
                    response = inner(request, context)
                except BaseException:
                    record(method, context.code or grpc.StatusCode.UNKNOWN, time.perf_counter() - start)
                    raise
                record(method, context.code or grpc.StatusCode.OK, time.perf_counter() - start)
                return response

        return wrap(call, handler.request_deserializer, handler.response_serializer)


class _CodeKeeper:
    """A blocking handler's context (grpc.aio's has no code()), remembering the code it ends with."""

    def __init__(self, context):
        self._context = context
        self.code: grpc.StatusCode | None = None

    def abort(self, code, details="", trailing_metadata=()):
        self.code = code
        self._context.abort(code, details, trailing_metadata)

    def set_code(self, code) -> None:
        self.code = code
        self._context.set_code(code)

    def __getattr__(self, name):
        return getattr(self._context, name)


def _code(context, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()  # set by context.abort / set_code; None when the handler left it alone
    return code if isinstance(code, grpc.StatusCode) else default
