"""Prometheus metrics of the control plane, served at /metrics.

Two kinds: what the database knows (jobs by state, restarts), read at scrape time so every replica reports
the same; and what this process saw: API calls and their latencies, recorded by a gRPC interceptor, and
checkpoint commits, counted as the TrainerService records them. A commit's row may later be deleted by the
job's retention policy, so the rows are no counter; like every process counter, this one starts at 0 when
the process does (Prometheus' rate() and increase() handle that) and is summed over replicas. Each
ControlPlane has its own registry, so several in one process (tests) don't clash."""

from __future__ import annotations

import asyncio
import inspect
import time

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from orchestrator.store import Database, Event, Job, JobState


class ServiceMetrics:
    def __init__(self, db: Database):
        self.registry = CollectorRegistry()
        self.registry.register(_DatabaseCollector(db))
        self.api_calls = Counter("roundhouse_api_calls", "gRPC calls handled, by method and status code",
                                 ["method", "code"], registry=self.registry)
        self.api_latency = Histogram("roundhouse_api_call_seconds", "gRPC call latency, by method",
                                     ["method"], registry=self.registry)
        self.checkpoint_commits = Counter("roundhouse_checkpoint_commits", "Checkpoints committed (reports "
                                          "recorded by this process; retries not counted)", registry=self.registry)
        self.interceptor = _ApiMetricsInterceptor(self)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def checkpoint_committed(self) -> None:
        self.checkpoint_commits.inc()

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.api_calls.labels(method, code.name).inc()
        self.api_latency.labels(method).observe(seconds)


class _DatabaseCollector:
    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        with self.db.read() as session:
            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            restarts = session.scalar(select(func.count()).select_from(Event).where(Event.type == "StateChanged",
                                                                                    Event.to_state == "RESTARTING",
                                                                                    Event.from_state != "RESTARTING"))
        jobs = GaugeMetricFamily("roundhouse_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], by_state.get(state.value, 0))
        yield jobs
        yield CounterMetricFamily("roundhouse_job_restarts", "Restarts of jobs (transitions to RESTARTING)",
                                  value=restarts or 0)


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
