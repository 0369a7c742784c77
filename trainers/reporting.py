"""The rank's agent: talks to the control plane's TrainerService from a background thread.

Every rank heartbeats about once a second with the step it has finished; rank 0 also queues one MetricPoint
per step (with µP's top singular values every `model.mup.sigma_every_steps` steps), sent in batches of at most
MAX_POINTS_PER_CALL points and MAX_BYTES_PER_CALL bytes, and one report per checkpoint event (committed,
restored, rejected, removed).
Training never waits on the control plane and never sees its errors:

- A failed call is logged once per outage (from the first failure to the next success), then retried on the
  thread's own rhythm. Metric points stay queued until a ReportMetrics call carrying them succeeds; past
  `max_pending` points the oldest are dropped. Checkpoint reports are few and never dropped.
- Any answer with stop=True sets `stop_reason`; the training loop checks it after every step.
- `close()` waits a bounded time for the queue to drain, then stops the thread.

Without ROUNDHOUSE_SERVER the trainer uses `NullReporter`, which does nothing."""

from __future__ import annotations

import itertools
import resource
import sys
import threading
import time
from collections import deque
from typing import Protocol

import grpc

from roundhouse.v1 import job_pb2, trainer_service_pb2 as ts, trainer_service_pb2_grpc
from trainers.env import RankEnv
from trainers.say import say

HEARTBEAT_INTERVAL = 1.0
METRICS_INTERVAL = 0.5
RPC_TIMEOUT = 2.0
MAX_PENDING = 4096
MAX_POINTS_PER_CALL = 512
MAX_BYTES_PER_CALL = 1 << 20  # well under gRPC's 4 MiB message limit, whatever the points carry
FLUSH_TIMEOUT = 5.0
# Reconnect quickly once the control plane is back (gRPC's default backoff grows to two minutes).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def metric_point(step: int, attempt: int, rank: int, *, loss: float | None = None, val_loss: float | None = None,
                 tokens_per_second: float = 0.0, learning_rate: float = 0.0,
                 sigma_max: dict[str, float] | None = None) -> job_pb2.MetricPoint:
    """`sigma_max`: each matrix's top singular value by global name (at most
    contract.metrics.MAX_SIGMA_PARAMETERS of them: trainers.mup.reported_matrices picks them)."""
    point = job_pb2.MetricPoint(step=step, attempt=attempt, rank=rank, tokens_per_second=tokens_per_second,
                                memory_bytes=peak_rss_bytes(), learning_rate=learning_rate,
                                sigma_max=sigma_max or {})
    if loss is not None:
        point.loss = loss
    if val_loss is not None:
        point.val_loss = val_loss
    point.time.GetCurrentTime()
    return point


class ReporterLike(Protocol):
    @property
    def stop_reason(self) -> str | None: ...
    def start(self) -> None: ...
    def set_step(self, step: int) -> None: ...
    def set_phase(self, phase: str) -> None: ...
    def add_point(self, point: job_pb2.MetricPoint) -> None: ...
    def add_checkpoint_report(self, request: ts.ReportCheckpointRequest) -> None: ...
    def stop_heartbeats(self) -> None: ...
    def close(self, flush_timeout: float = FLUSH_TIMEOUT) -> None: ...


class NullReporter:
    """No control plane: nothing is sent, and nothing ever asks the rank to stop."""

    stop_reason = None

    def start(self) -> None: pass
    def set_step(self, step: int) -> None: pass
    def set_phase(self, phase: str) -> None: pass
    def add_point(self, point: job_pb2.MetricPoint) -> None: pass
    def add_checkpoint_report(self, request: ts.ReportCheckpointRequest) -> None: pass
    def stop_heartbeats(self) -> None: pass
    def close(self, flush_timeout: float = FLUSH_TIMEOUT) -> None: pass


class Reporter:
    def __init__(self, server: str, job: str, attempt: int, rank: int, token: str, *,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL, metrics_interval: float = METRICS_INTERVAL,
                 rpc_timeout: float = RPC_TIMEOUT, max_pending: int = MAX_PENDING, log=None,
                 server_ca: str | None = None, client_cert: str | None = None, client_key: str | None = None):
        self.server, self.job, self.attempt, self.rank = server, job, attempt, rank
        self.heartbeat_interval = heartbeat_interval
        self.metrics_interval = metrics_interval
        self.rpc_timeout = rpc_timeout
        self._log = log or (lambda msg: say(f"[rank {rank}] {msg}", file=sys.stderr))
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = _channel(server, server_ca, client_cert, client_key)
        self._stub = trainer_service_pb2_grpc.TrainerServiceStub(self._channel)

        self._lock = threading.Lock()
        self._pending: deque[tuple[int, job_pb2.MetricPoint]] = deque(maxlen=max_pending)  # (sequence, point)
        self._sequence = itertools.count()
        self._dropped = 0
        self._checkpoint_reports: deque[ts.ReportCheckpointRequest] = deque()
        self._heartbeats_stopped = False
        self._send_heartbeat_now = False
        self._step = 0
        self._phase = ""
        self._stop_reason: str | None = None
        self._wake = threading.Event()
        self._flush_deadline: float | None = None  # set by close()
        self._in_outage = False
        self._thread = threading.Thread(target=self._run, name="roundhouse-reporter", daemon=True)

    # -- called by the training loop -------------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._thread.start()

    def set_step(self, step: int) -> None:
        self._step = step

    def set_phase(self, phase: str) -> None:
        """What the rank is doing while it is not training ("" once it trains), sent with every heartbeat;
        the change goes out at once, so a rank that sits at step 0 says why."""
        if phase != self._phase:
            self._phase = phase
            self._send_heartbeat_now = True
            self._wake.set()

    def add_point(self, point: job_pb2.MetricPoint) -> None:
        with self._lock:
            if len(self._pending) == self._pending.maxlen:
                self._dropped += 1
            self._pending.append((next(self._sequence), point))

    def add_checkpoint_report(self, request: ts.ReportCheckpointRequest) -> None:
        request.job, request.attempt, request.rank = self.job, self.attempt, self.rank
        with self._lock:
            self._checkpoint_reports.append(request)
        self._wake.set()

    def stop_heartbeats(self) -> None:
        """What a hung rank looks like from outside (a test hook): no more heartbeats."""
        self._heartbeats_stopped = True

    def close(self, flush_timeout: float = FLUSH_TIMEOUT) -> None:
        """Sends what is queued, waiting at most `flush_timeout` seconds (plus one RPC), then stops."""
        self._flush_deadline = time.monotonic() + flush_timeout
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(flush_timeout + self.rpc_timeout + 1.0)
        if self._pending:
            self._log(f"{len(self._pending)} metric points were never delivered to {self.server}")
        if self._checkpoint_reports:
            self._log(f"{len(self._checkpoint_reports)} checkpoint reports were never delivered to {self.server}")
        self._channel.close()

    # -- the thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_heartbeat = 0.0
        next_metrics = 0.0
        final_heartbeat_sent = False
        while True:
            now = time.monotonic()
            closing = self._flush_deadline is not None
            delivered = True
            # Closing: one last heartbeat carries the final step (the control plane then allows for the
            # silence of a rank that is shutting down).
            due = now >= next_heartbeat or self._send_heartbeat_now or (closing and not final_heartbeat_sent)
            if due and not self._heartbeats_stopped:
                final_heartbeat_sent = closing
                self._send_heartbeat_now = False
                self._call("Heartbeat", ts.HeartbeatRequest(job=self.job, attempt=self.attempt, rank=self.rank,
                                                            step=self._step, phase=self._phase))
                next_heartbeat = time.monotonic() + self.heartbeat_interval
            if now >= next_metrics or closing or self._checkpoint_reports:
                delivered = self._send_checkpoint_reports() and self._send_metrics()
                next_metrics = time.monotonic() + (self.metrics_interval if delivered else self.heartbeat_interval)
            if closing:
                if (not self._pending and not self._checkpoint_reports) or time.monotonic() >= self._flush_deadline:
                    return
                if not delivered:
                    time.sleep(min(0.2, max(0.0, self._flush_deadline - time.monotonic())))
                continue
            self._wake.wait(max(0.0, min(next_heartbeat, next_metrics) - time.monotonic()))
            self._wake.clear()

    def _send_checkpoint_reports(self) -> bool:
        while self._checkpoint_reports:
            if self._call("ReportCheckpoint", self._checkpoint_reports[0]) is None:
                return False
            with self._lock:
                self._checkpoint_reports.popleft()
        return True

    def _send_metrics(self) -> bool:
        """Sends the queued points, oldest first; False when a call failed (the points stay queued)."""
        while True:
            with self._lock:
                batch = first_batch(self._pending, MAX_POINTS_PER_CALL, MAX_BYTES_PER_CALL)
            if not batch:
                return True
            request = ts.ReportMetricsRequest(job=self.job, attempt=self.attempt, rank=self.rank,
                                              points=[point for _, point in batch])
            if self._call("ReportMetrics", request) is None:
                return False
            last_sent = batch[-1][0]
            with self._lock:
                # Points dropped from the front meanwhile only make this pop fewer.
                while self._pending and self._pending[0][0] <= last_sent:
                    self._pending.popleft()

    def _call(self, method: str, request):
        try:
            response = getattr(self._stub, method)(request, timeout=self.rpc_timeout, metadata=self._metadata)
        except Exception as exc:  # grpc.RpcError mostly; nothing here may reach training
            ended = isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            if ended and self._stop_reason is None:  # this attempt has ended: nothing it sends counts any more
                self._stop_reason = exc.details() or "the attempt has ended"
            if not self._in_outage:
                self._in_outage = True
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else repr(exc)
                self._log(f"cannot reach the control plane at {self.server} ({method}: {detail}); "
                          f"training goes on, metrics are kept and resent")
            return None
        if self._in_outage:
            self._in_outage = False
            dropped, self._dropped = self._dropped, 0
            lost = f", {dropped} oldest metric points were dropped" if dropped else ""
            self._log(f"the control plane at {self.server} is reachable again{lost}")
        if response.stop and self._stop_reason is None:
            self._stop_reason = response.stop_reason or "the control plane asked this rank to stop"
        return response


def _channel(server: str, server_ca: str | None, client_cert: str | None, client_key: str | None) -> grpc.Channel:
    """TLS when the control plane gave the rank the certificates to trust (ROUNDHOUSE_SERVER_CA), with its
    client certificate if it gave one (mutual TLS); else plaintext."""
    if server_ca:
        credentials = grpc.ssl_channel_credentials(server_ca.encode(), client_key and client_key.encode(),
                                                   client_cert and client_cert.encode())
        return grpc.secure_channel(server, credentials, options=_CHANNEL_OPTIONS)
    return grpc.insecure_channel(server, options=_CHANNEL_OPTIONS)


def first_batch(pending, max_points: int, max_bytes: int) -> list[tuple[int, job_pb2.MetricPoint]]:
    """The oldest queued (sequence, point) pairs that fit in one call: at most `max_points` points and
    `max_bytes` bytes of them, but always at least one (a point alone is bounded by contract.metrics)."""
    batch, size = [], 0
    for item in itertools.islice(pending, max_points):
        size += item[1].ByteSize()
        if batch and size > max_bytes:
            break
        batch.append(item)
    return batch


def make_reporter(env: RankEnv) -> ReporterLike:
    if not env.server:
        return NullReporter()
    return Reporter(env.server, env.job, env.attempt, env.rank, env.token, server_ca=env.server_ca,
                    client_cert=env.client_cert, client_key=env.client_key)
