"""The control plane process: gRPC API (with health and reflection), the status page over HTTP, and the
job and sweep controllers, all over one database."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from contract.errors import FieldViolation
from contract.reach import reach_violations
from contract.spec import JobSpec
from orchestrator import config
from orchestrator.api.errors import AsyncInternalErrors
from orchestrator.api.job_service import JobService
from orchestrator.api.streams import DEFAULT_MAX_STREAMS_PER_USER, Streams
from orchestrator.api.sweep_service import SweepService
from orchestrator.api.trainer_service import TrainerService
from orchestrator.auth import AuthInterceptor, UserTokens, ensure_admin_token, rank_credential_key
from orchestrator.controller import JobController, ReconcilerSettings, SweepController
from orchestrator.dashboard import ServiceMetrics, create_app
from orchestrator.heartbeats import Heartbeats
from orchestrator.launcher import Launcher
from orchestrator.launcher.registry import create_launcher
from orchestrator.service.limits import Limits, Quotas
from orchestrator.store import Database, migrate
from orchestrator.tls import ServerTls
from roundhouse.v1 import (job_service_pb2, job_service_pb2_grpc, sweep_service_pb2, sweep_service_pb2_grpc,
                           trainer_service_pb2, trainer_service_pb2_grpc)

log = logging.getLogger(__name__)

SERVICES = (job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
            sweep_service_pb2.DESCRIPTOR.services_by_name["SweepService"].full_name,
            trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name)
# Threads of the gRPC server's pool, where unary calls run (streams do not: they are coroutines). Few: every
# one competes for the GIL with the event loop (health, streams) and the job controller's workers, and a call
# waits as well in gRPC's queue as on a thread. Under 64 clients (benchmarks/load.py) 64 threads left a new
# job 17 s (p50) before the controller's first pass; 8 threads, 0.1 s.
UNARY_THREADS = 8
# The server's garbage collector: what start-up made is frozen out of it, and older generations are collected
# rarer. Every collection stops every thread, the loop that answers the health check among them: full
# collections of a busy server's heap were its tail under load, and a young generation of 50,000 objects took
# up to ~140 ms to collect where 10,000 took ~45 ms for the same total (docs/benchmarks.md, "Load").
GC_THRESHOLDS = (10_000, 20, 20)
# Threads where streams' database reads run, and where logs are read (apart: a Kubernetes log follow waits
# in its stream). Every stream of every user shares them; none holds one while it waits for news.
STREAM_THREADS = 8
LOG_THREADS = 8


@dataclass
class ServerSettings:
    home: Path
    db_url: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int = config.DEFAULT_GRPC_PORT
    http_port: int = config.DEFAULT_HTTP_PORT
    # A launcher's name in the roundhouse.launchers entry points (orchestrator/launcher/registry.py).
    launcher: str = "local"
    # The launcher's own options by name, as `roundhouse serve` passes them (kubernetes: namespace, image,
    # volume_claim, unschedulable_timeout_seconds).
    launcher_options: dict[str, Any] = field(default_factory=dict)
    # The most ranks the launcher runs at once (None: the launcher's default: the local launcher's is the
    # machine's cores, Kubernetes' none); jobs that ask for more are reshaped.
    max_ranks: int | None = None
    # What a spec may ask for and per-user quotas (`roundhouse serve --limits FILE`; default: no limits).
    limits: Limits = field(default_factory=Limits)
    # --launcher kubernetes: a k8s.launcher.KubernetesSettings (namespace, image, ...; None: the defaults), and
    # the kubeconfig to reach the cluster (None: the in-cluster config inside a pod, else ~/.kube/config).
    kubernetes: Any = None
    kubeconfig: str | None = None
    # How ranks reach this control plane when it is not `host:grpc_port` (a Service's DNS name in a cluster).
    advertise_address: str | None = None
    # Where a spec's data.path may lead (`--data-root DIR`, repeatable; contract.reach). None: only the built-in
    # corpus. On Kubernetes, the data directory of the ranks' shared volume instead.
    data_roots: tuple[Path, ...] = ()
    # Accept and honour the trainer's test hooks (RH_FAULT_*, RH_TEST_* in a spec's env): for test servers only.
    allow_test_hooks: bool = False
    # Off only for benchmarks of the API alone: jobs are recorded but never launched.
    reconcile: bool = True
    reconciler: ReconcilerSettings = ReconcilerSettings()
    # Threads of the job controller: jobs are reconciled in parallel, each by one worker at a time.
    controller_workers: int = 4
    # The most streams (WatchJob, StreamLogs, WatchSweep) one user may hold open at once.
    max_streams_per_user: int = DEFAULT_MAX_STREAMS_PER_USER
    # TLS for gRPC and the dashboard (None: plaintext): `roundhouse serve --tls-cert/--tls-key/...`.
    tls: ServerTls | None = None
    # The dashboard: where browsers reach it (the only origin whose POSTs it accepts; None: a request's own
    # Host), and how long a login lasts (`roundhouse serve --public-url`, `--session-ttl`).
    public_url: str | None = None
    session_ttl_seconds: float = config.DEFAULT_SESSION_TTL_SECONDS


class ControlPlane:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # The database, the admin token and the runs' files live here: this user's alone (0700).
        config.private_dir(settings.home, warn=True)
        self.db = Database(settings.db_url or config.default_db_url(settings.home))
        self.grpc_server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.streams: Streams | None = None
        self.heartbeats: Heartbeats | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.job_controller: JobController | None = None
        self.sweep_controller: SweepController | None = None
        self.launcher: Launcher | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self.metrics: ServiceMetrics | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.settings.host}:{self.grpc_port}"

    @property
    def dashboard_url(self) -> str:
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{self.settings.host}:{self.http_port}/"

    def start(self) -> None:
        migrate(self.db)
        ensure_admin_token(self.db, self.settings.home)
        credential_key = rank_credential_key(self.db)
        launcher = self.launcher = create_launcher(self.settings)
        self.users = UserTokens(self.db)
        self.metrics = ServiceMetrics(self.db)
        self.metrics.start()  # the job figures /metrics serves, read on a thread every few seconds
        self.heartbeats = Heartbeats(self.db)

        # The gRPC server runs on an event loop of its own thread (grpc.aio). Unary calls are blocking
        # functions on its pool; streams are coroutines on the loop (orchestrator/api/streams.py); the health
        # check is answered on the loop itself, so neither pool nor database stands in its way.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        try:
            self._on_loop(self._bind_grpc())
            tls = self.settings.tls
            self.job_controller = JobController(self.db, launcher, credential_key,
                                                self.settings.advertise_address or self.grpc_address,
                                                self.settings.reconciler, workers=self.settings.controller_workers,
                                                heartbeats=self.heartbeats,
                                                rank_tls=tls.rank_tls() if tls else None)
            # Sweeps own ordinary jobs (trials, a target): the job controller runs them like any other.
            self.sweep_controller = SweepController(self.db, self.job_controller.wake)
            self._on_loop(self._serve_grpc(credential_key))
        except BaseException:
            self._stop_loop()
            raise

        self._start_http()
        self.heartbeats.start()
        if self.settings.reconcile:
            self.job_controller.start()
            self.sweep_controller.start()
        self._on_loop(self._set_serving())

    def _on_loop(self, coroutine):
        """Runs a coroutine on the gRPC server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _bind_grpc(self) -> None:
        # so_reuseport off: a second control plane on the same port must fail, not silently share it.
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=UNARY_THREADS, thread_name_prefix="grpc"),
            # AsyncInternalErrors outside AuthInterceptor: a token lookup that fails is answered like a handler's error.
            interceptors=[self.metrics.interceptor, AsyncInternalErrors(), AuthInterceptor(self.users)],
            options=[("grpc.so_reuseport", 0)])
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        tls = self.settings.tls
        try:
            port = server.add_secure_port(address, tls.server_credentials()) if tls else \
                server.add_insecure_port(address)
        except RuntimeError:  # grpc.aio says so by raising
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.grpc_port = port
        self.grpc_server = server

    async def _serve_grpc(self, credential_key: bytes) -> None:
        server = self.grpc_server
        streams = self.streams = Streams(
            self.users, futures.ThreadPoolExecutor(max_workers=STREAM_THREADS, thread_name_prefix="streams"),
            futures.ThreadPoolExecutor(max_workers=LOG_THREADS, thread_name_prefix="logs"),
            per_user=self.settings.max_streams_per_user)
        quotas = Quotas(self.settings.limits)  # one per server: its per-user locks serve both services
        job_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobService(self.db, self.users, self.launcher, self.job_controller.wake, streams, self.reach_violations,
                       quotas), server)
        sweep_service_pb2_grpc.add_SweepServiceServicer_to_server(
            SweepService(self.db, self.users, self.sweep_controller.wake, streams, self.reach_violations, quotas),
            server)
        trainer_service = TrainerService(self.db, credential_key, on_checkpoint_commit=self.metrics.checkpoint_committed,
                                         heartbeats=self.heartbeats)
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(trainer_service, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await server.start()

    async def _set_serving(self) -> None:
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def reach_violations(self, spec: JobSpec) -> list[FieldViolation]:
        """What CreateJob refuses in a valid spec: what it may not reach under this server's policy
        (contract.reach, with the ranks' view of the data roots), a job directory that a symlink already
        leads elsewhere (the launcher's to say), and more ranks at the fewest than the launcher ever runs at
        once (the job would wait for them forever)."""
        policy = reach_violations(spec, self.launcher.data_roots, self.settings.allow_test_hooks)
        capacity = self.launcher.capacity()
        if capacity is not None and spec.resources.min_ranks > capacity:
            policy.append(FieldViolation("resources.min_ranks", (
                f"the job needs at least {spec.resources.min_ranks} ranks, and this server runs at most {capacity} "
                "at once (roundhouse serve --max-ranks; set resources.min_ranks to let it run reshaped)")))
        return policy + self.launcher.directory_violations(spec)

    def _start_http(self) -> None:
        app = create_app(self.db, self.users, self.launcher, self.metrics, self.job_controller.wake,
                         self.sweep_controller.wake, self.settings.public_url, self.settings.session_ttl_seconds)
        ssl = self.settings.tls.uvicorn_options() if self.settings.tls else {}
        self._http = uvicorn.Server(uvicorn.Config(app, host=self.settings.host, port=self.settings.http_port,
                                                   log_level="warning", lifespan="off", **ssl))
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._http_thread.start()
        while not self._http.started and self._http_thread.is_alive():
            threading.Event().wait(0.02)
        if not self._http.started:
            raise OSError(f"cannot serve HTTP on {self.settings.host}:{self.settings.http_port}")
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stops serving. Running jobs keep running: a control plane started later adopts them."""
        if self.sweep_controller:
            self.sweep_controller.stop()
        if self.job_controller:
            self.job_controller.stop()
        if self.launcher:
            self.launcher.close()
        if self.grpc_server and self._loop:
            self._on_loop(self.grpc_server.stop(grace=2))
            self.grpc_server = None
        self._stop_loop()
        if self.heartbeats:
            self.heartbeats.stop()  # the last summary
        if self.metrics:
            self.metrics.stop()
        if self._http:
            self._http.should_exit = True
            self._http_thread.join(timeout=5)
        if self.streams:
            self.streams.executor.shutdown(wait=False, cancel_futures=True)
            self.streams.log_executor.shutdown(wait=False, cancel_futures=True)
        self.db.dispose()

    def _stop_loop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._loop.close()
            self._loop = None


async def _cancel_tasks() -> None:
    """Ends what is left on the loop (the watches' poll) before the loop stops."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def tune_garbage_collector() -> None:
    """For a long-running server process, once it has started (see GC_THRESHOLDS)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_server(settings: ServerSettings) -> None:
    """Runs the control plane until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plane = ControlPlane(settings)
    plane.start()
    tune_garbage_collector()
    print(f"Roundhouse control plane: gRPC on {plane.grpc_address}, dashboard at {plane.dashboard_url}", flush=True)
    print(f"Database: {plane.db.url.split('@')[-1]}; admin token in {config.token_file(settings.home)}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # With a timeout: Python runs a signal's handler only in the main thread, and a main thread blocked on a
    # lock without one never wakes for a signal the kernel delivered to another of the server's threads.
    while not done.wait(1.0):
        pass
    plane.stop()
