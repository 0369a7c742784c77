"""A shared control plane under load: many clients mixing every JobService call, WatchJob streams held open,
and (on PostgreSQL) the database restarted mid-run. What a team's deployment would meet, in one run.

The control plane runs in its own process with an in-memory launcher (no rank processes) capped at
`--capacity` ranks, whose attempts succeed `--run-seconds` after they are launched, so jobs queue, wait for
ranks, start and end throughout. `--clients` client threads (one user and token each) call back to back, each
call drawn at random: CreateJob (one or two ranks), ListJobs, GetJob, StreamLogs and CancelJob of their own
jobs. `--watches` WatchJob streams stay open on a few jobs that run all run long (one rank each, on top of
the capacity), spread over the users. A probe in a process of its own (as a kubelet's) calls the gRPC health
check every 50 ms while the load lasts (it stops before the clients do); the server's RSS is read every 2 s.
With `--database postgresql` and `pg_ctl` on the PATH, a private PostgreSQL instance is made for the run and
restarted once at half time (`--no-restart`: the shared server at `--postgres`, not restarted).
`--busy-processes N` runs N processes that only take CPU beside it all run long: a machine shared with other
work (a slower hour) made on purpose, so that the health check's tail on such a machine can be compared run
against run.

Reported: calls by status code per method (a refusal the call may get by design, such as CancelJob of a job
that already ended, is counted apart from errors; UNAVAILABLE while the database restarts is counted apart
too), p50/p99 of each method's successful calls, the health check's p99 (overall and its worst 10 s window,
and where that window was: negative seconds are while the watches open), the server's garbage collections
(count, total and longest pause by generation), the server's RSS over time and its growth over the last 80 %
of the run, the controller's lag (a new job's first pass: from its Created event to the next; a cancel: from
the request to CANCELLED), and jobs lost (a
CreateJob answered OK without its row), created although refused (a CreateJob answered with an error whose
row exists), or run twice (two attempts of one job running at once, or more ranks running than the
capacity, as the launcher saw them).

    python -m benchmarks.load [--clients 64] [--seconds 300] [--watches 200] [--database sqlite|postgresql]
                              [--capacity 8] [--run-seconds 3] [--no-restart] [--postgres URL]
                              [--unary-threads N] [--gc tuned|freeze|default] [--gc-young N]
                              [--busy-processes N]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, select

from benchmarks.controller_throughput import CappedLauncher
from benchmarks.create_job import postgres_schema_url
from benchmarks.streams import summary
from contract.spec import parse_spec, spec_to_proto
from orchestrator.auth import create_token
from orchestrator.config import token_file
from orchestrator.launcher import AttemptRef, AttemptStatus, LaunchRequest, Phase
from orchestrator.launcher.local import free_port
from orchestrator.launcher.logs import LogRange, LogRead
from orchestrator.process import wait_healthy
from orchestrator.server import GC_THRESHOLDS, UNARY_THREADS
from orchestrator.store import Database, Event, Job
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

LOG_TEXT = b"".join(b"step %d loss 2.5\n" % step for step in range(200))  # every rank's log, ~3.5 KB
HEALTH_EVERY_SECONDS = 0.05
RSS_EVERY_SECONDS = 2.0
CALL_TIMEOUT_SECONDS = 30.0
# A call may be refused by design: CancelJob of a job that has already ended, StreamLogs of one not launched.
EXPECTED_REFUSALS = {("CancelJob", "FAILED_PRECONDITION"), ("StreamLogs", "FAILED_PRECONDITION")}
# After the database is back, calls may still fail for a moment (pooled connections found dead one by one).
RESTART_GRACE_SECONDS = 10.0
ANCHORS = 4  # the jobs the held watches look at; they run until the end ("w..." names; the rest are "l...")
MIX = (("CreateJob", 0.25), ("ListJobs", 0.2), ("GetJob", 0.3), ("StreamLogs", 0.15), ("CancelJob", 0.1))


# -- the control plane's side (a separate process) ---------------------------------------------------------


class FinishingLauncher(CappedLauncher):
    """CappedLauncher whose attempts succeed `run_seconds` after their launch, and which counts what a
    launcher can see of the controller's decisions: the most ranks running at once, a gang launched while
    another of the same job still runs, an attempt launched again (adoption after an interrupted launch)."""

    def __init__(self, capacity: int, run_seconds: float, stats_path: Path):
        self._capacity = capacity
        self._run_seconds = run_seconds
        self._stats_path = stats_path
        self._notify = None
        self._lock = threading.Lock()
        self._running: dict[tuple[str, int], tuple[float, int]] = {}  # (job, attempt) -> (launched at, ranks)
        self._launched: set[tuple[str, int]] = set()
        self.stats = Counter()

    def subscribe(self, notify) -> None:
        self._notify = notify

    def capacity(self) -> int:
        return self._capacity

    def launch(self, request: LaunchRequest) -> dict:
        key = (request.job, request.attempt)
        with self._lock:
            if key in self._launched:
                self.stats["attempts_launched_again"] += 1
            else:
                self._launched.add(key)
                self.stats["attempts_launched"] += 1
                if any(job == request.job for job, _ in self._running):
                    self.stats["gangs_overlapping"] += 1
                self._running[key] = (time.monotonic(), request.world_size)
                in_use = sum(ranks for _, ranks in self._running.values())
                self.stats["most_ranks_running"] = max(self.stats["most_ranks_running"], in_use)
        if self._notify is not None and not request.job.startswith("w"):  # the ranks "exit 0": tell the controller
            timer = threading.Timer(self._run_seconds, self._notify, [request.job])
            timer.daemon = True
            timer.start()
        return {"fake": request.attempt}

    def status(self, ref: AttemptRef) -> AttemptStatus:
        key = (ref.job, ref.attempt)
        with self._lock:
            running = self._running.get(key)
            if running is None:
                return AttemptStatus(Phase.SUCCEEDED)
            if ref.job.startswith("w") or time.monotonic() - running[0] < self._run_seconds:
                return AttemptStatus(Phase.RUNNING)
            del self._running[key]  # every rank exited 0: its ranks are free
        return AttemptStatus(Phase.SUCCEEDED)

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        with self._lock:
            self._running.pop((ref.job, ref.attempt), None)

    def logs(self, ref, rank, follow, attempt_ended, where: LogRange = LogRange()):
        yield LogRead(0, LOG_TEXT)
        while follow and not attempt_ended():
            yield LogRead(len(LOG_TEXT), b"")

    def write_stats(self) -> None:
        self._stats_path.write_text(json.dumps(dict(self.stats)))


def serve(home: Path, db_url: str, port: int, capacity: int, run_seconds: float, stats_path: Path,
          unary_threads: int, gc_mode: str, gc_young: int) -> None:
    """The control plane with the finishing launcher, until SIGTERM; then the launcher's counts to a file.
    `unary_threads`, `gc_mode` and `gc_young` are for comparing the server's settings (the defaults are
    `roundhouse serve`'s)."""
    from orchestrator import server
    from orchestrator.server import ControlPlane, ServerSettings

    server.UNARY_THREADS = unary_threads
    server.GC_THRESHOLDS = (gc_young, *server.GC_THRESHOLDS[1:])
    launcher = FinishingLauncher(capacity, run_seconds, stats_path)
    server.create_launcher = lambda settings: launcher  # in place of the registry's launchers
    plane = ControlPlane(ServerSettings(home=home, db_url=db_url, grpc_port=port, http_port=0))
    plane.start()
    if gc_mode == "tuned":
        server.tune_garbage_collector()  # as `roundhouse serve` does
    elif gc_mode == "freeze":
        gc.freeze()
    # Count the job controller's passes (a fact, where its lag is a time on a shared machine).
    runtime = plane.job_controller.runtime
    reconcile = runtime._reconcile

    def counted(key: str):
        launcher.stats["controller_passes"] += 1
        return reconcile(key)

    runtime._reconcile = counted
    wake = plane.job_controller._wake_admissible

    def counted_wake():
        launcher.stats["admission_passes"] += 1
        woken = wake()
        launcher.stats["admission_woken"] += len(woken)
        return woken

    plane.job_controller._wake_admissible = counted_wake

    # The garbage collector's pauses, by generation (a collection stops every thread, the loop's health check
    # among them): how many, their total and the longest, in milliseconds.
    collection_began = [0.0]

    def time_collections(phase: str, info: dict) -> None:
        if phase == "start":
            collection_began[0] = time.perf_counter()
            return
        took = 1000 * (time.perf_counter() - collection_began[0])
        generation = info["generation"]
        launcher.stats[f"gc{generation}_count"] += 1
        launcher.stats[f"gc{generation}_ms"] += took
        launcher.stats[f"gc{generation}_max_ms"] = max(launcher.stats[f"gc{generation}_max_ms"], took)

    gc.callbacks.append(time_collections)

    def sample_queue() -> None:  # how many jobs wait for a worker: the controller's backlog
        while not done.wait(1.0):
            depth = len(runtime.queue)
            launcher.stats["queue_samples"] += 1
            launcher.stats["queue_depth_sum"] += depth
            launcher.stats["queue_depth_max"] = max(launcher.stats["queue_depth_max"], depth)
    done = threading.Event()
    threading.Thread(target=sample_queue, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    # With a timeout: a wait without one may never see a signal that another thread received.
    while not done.wait(1.0):
        pass
    plane.stop()
    launcher.write_stats()


# -- a private PostgreSQL instance -------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL instance of its own for one run (initdb in a temporary directory), so it can be restarted
    without disturbing anyone else's. As root, its commands run as the `postgres` user (initdb refuses root)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def available() -> bool:
        return shutil.which("pg_ctl") is not None and shutil.which("initdb") is not None

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as, *command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._as:  # the postgres user must reach its directory inside this run's temporary one
            os.chmod(self.directory.parent, 0o755)
            shutil.chown(self.directory, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "bench", "--no-sync")
        self._pg_ctl("start")
        return f"postgresql+psycopg://bench@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "-o", options,
                  *extra, action)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        try:
            self._pg_ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass


# -- the clients' side -------------------------------------------------------------------------------------


class Record:
    """What the clients saw: calls by (method, code), successful calls' latencies, each with its time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls: list[tuple[float, float, str, str]] = []  # (began, ended: monotonic; method; code name)
        self.latencies: dict[str, list[float]] = defaultdict(list)

    def call(self, method: str, fn):
        began = time.monotonic()
        try:
            result = fn()
            code = "OK"
        except grpc.RpcError as error:
            result, code = error, error.code().name
        ended = time.monotonic()
        took = ended - began
        with self._lock:
            self.calls.append((began, ended, method, code))
            if code == "OK":
                self.latencies[method].append(took)
        return code, result


def job_spec(name: str, ranks: int):
    data = {"name": name, "labels": {"bench": "load"}}
    if ranks == 2:
        data |= {"parallelism": {"dp": 2}, "training": {"global_batch_size": 16, "micro_batch_size": 8}}
    return spec_to_proto(parse_spec(data))


def client_loop(index: int, address: str, token: str, run_id: str, stop: threading.Event, record: Record,
                created: list[str], refused: list[str]) -> None:
    rng = random.Random(index)
    metadata = [("authorization", f"Bearer {token}")]
    channel = grpc.insecure_channel(address)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    mine: list[str] = []
    cancelled: set[str] = set()
    methods, weights = zip(*MIX)
    n = 0
    try:
        while not stop.is_set():
            method = rng.choices(methods, weights)[0]
            if method != "CreateJob" and not mine:
                method = "CreateJob"
            if method == "CreateJob":
                name = f"l{run_id}-{index}-{n}"
                n += 1
                spec = job_spec(name, 2 if rng.random() < 0.2 else 1)
                code, _ = record.call(method, lambda: stub.CreateJob(js.CreateJobRequest(spec=spec), metadata=metadata,
                                                                     timeout=CALL_TIMEOUT_SECONDS))
                (mine if code == "OK" else refused).append(name)
                if code == "OK":
                    created.append(name)
            elif method == "ListJobs":
                record.call(method, lambda: stub.ListJobs(js.ListJobsRequest(page_size=20), metadata=metadata,
                                                          timeout=CALL_TIMEOUT_SECONDS))
            elif method == "GetJob":
                name = rng.choice(mine)
                record.call(method, lambda: stub.GetJob(js.GetJobRequest(name=f"jobs/{name}"), metadata=metadata,
                                                        timeout=CALL_TIMEOUT_SECONDS))
            elif method == "StreamLogs":
                name = rng.choice(mine)
                record.call(method, lambda: list(stub.StreamLogs(js.StreamLogsRequest(name=f"jobs/{name}"),
                                                                 metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)))
            else:
                left = [name for name in mine[-50:] if name not in cancelled]
                if not left:
                    continue
                name = rng.choice(left)
                cancelled.add(name)
                record.call(method, lambda: stub.CancelJob(js.CancelJobRequest(name=f"jobs/{name}"), metadata=metadata,
                                                           timeout=CALL_TIMEOUT_SECONDS))
    finally:
        channel.close()


def hold_watch(address: str, token: str, job: str, stop: threading.Event, record: Record,
               opened: threading.Semaphore, first: list[bool]) -> None:
    """One WatchJob stream held open until the run ends; opened again (after a second) if it fails."""
    metadata = [("authorization", f"Bearer {token}")]
    channel = grpc.insecure_channel(address)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    try:
        while not stop.is_set():
            call = stub.WatchJob(js.WatchJobRequest(name=f"jobs/{job}"), metadata=metadata)
            stopper = threading.Thread(target=lambda c=call: (stop.wait(), c.cancel()), daemon=True)
            stopper.start()

            def read(call=call):
                try:
                    for _ in call:
                        if not first[0]:
                            first[0] = True
                            opened.release()
                except grpc.RpcError as error:
                    if not (stop.is_set() and error.code() == grpc.StatusCode.CANCELLED):  # our own end
                        raise

            code, _ = record.call("WatchJob", read)
            if stop.is_set():
                return
            if code != "OK":
                stop.wait(1.0)
    finally:
        channel.close()


def health_probe(address: str, stop, samples) -> None:
    """Runs in a process of its own, as a kubelet's probe would: the load generator's threads must not delay
    the probe's own reading of the answer. Sends its (began, took, code) samples when `stop` is set."""
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    taken = []
    try:
        while not stop.wait(HEALTH_EVERY_SECONDS):
            began = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            taken.append((began, time.monotonic() - began, code))
    finally:
        channel.close()
        samples.put(taken)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_probe(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    while True:
        try:
            samples.append((time.monotonic(), rss_mib(pid)))
        except OSError:
            return
        if stop.wait(RSS_EVERY_SECONDS):
            return


# -- one run -----------------------------------------------------------------------------------------------


def spin() -> None:
    """A process that only takes CPU: `--busy-processes` of them stand for a machine shared with other work."""
    while True:
        pass


def run(args, db_url: str, postgres: PrivatePostgres | None) -> dict:
    spawn = multiprocessing.get_context("spawn")
    busy = [spawn.Process(target=spin, daemon=True) for _ in range(args.busy_processes)]
    for process in busy:
        process.start()
    try:
        return run_server_and_load(args, db_url, postgres)
    finally:
        for process in busy:
            process.kill()
            process.join()


def run_server_and_load(args, db_url: str, postgres: PrivatePostgres | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        stats_path = Path(tmp) / "launcher.json"
        port = free_port()
        address = f"127.0.0.1:{port}"
        server_log = Path(tmp) / "server.log"
        with open(server_log, "wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "--serve", str(home), db_url,
                                       str(port), str(args.capacity + ANCHORS), str(args.run_seconds),
                                       str(stats_path), str(args.unary_threads), args.gc,
                                       str(args.gc_young)],
                                      cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(address, timeout=120, process=server)
            result = load(args, home, db_url, address, server.pid, postgres)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:  # never left behind
                server.kill()
                server.wait()
        result["launcher"] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        logged = server_log.read_text(errors="replace").splitlines()
        result["logged"] = {"database unavailable": sum("database unavailable (error" in line for line in logged),
                            "internal error": sum("internal error" in line for line in logged)}
        return result


def load(args, home: Path, db_url: str, address: str, server_pid: int, postgres: PrivatePostgres | None) -> dict:
    run_id = uuid.uuid4().hex[:6]
    db = Database(db_url)
    try:
        tokens = [create_token(db, f"load-{i}", "user") for i in range(args.clients)]
    finally:
        db.dispose()
    admin = [("authorization", f"Bearer {token_file(home).read_text().strip()}")]
    channel = grpc.insecure_channel(address)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    # The jobs the held watches look at: they run all run long (the launcher never ends a "w..." job).
    anchors = [f"w{run_id}-{i}" for i in range(ANCHORS)]
    for name in anchors:
        stub.CreateJob(js.CreateJobRequest(spec=job_spec(name, 1)), metadata=admin, timeout=60)
    channel.close()

    record = Record()
    stop = threading.Event()
    rss: list[tuple[float, float]] = []
    created: list[str] = []
    refused: list[str] = []
    spawn = multiprocessing.get_context("spawn")
    probe_stop, probe_samples = spawn.Event(), spawn.Queue()
    probe = spawn.Process(target=health_probe, args=(address, probe_stop, probe_samples), daemon=True)
    probe.start()
    threads = [threading.Thread(target=rss_probe, args=(server_pid, stop, rss), daemon=True)]
    opened = threading.Semaphore(0)
    for i in range(args.watches):  # spread over the users, round robin (each within the per-user limit)
        threads.append(threading.Thread(target=hold_watch, daemon=True, args=(
            address, tokens[i % len(tokens)], anchors[i % len(anchors)], stop, record, opened, [False])))
    for thread in threads:
        thread.start()
    for _ in range(args.watches):
        if not opened.acquire(timeout=120):
            raise SystemExit("the held watches did not all open within 120 s")

    began = time.monotonic()
    clients = [threading.Thread(target=client_loop, daemon=True, args=(
        i, address, tokens[i], run_id, stop, record, created, refused)) for i in range(args.clients)]
    for thread in clients:
        thread.start()
    restart_window = None
    if postgres is not None:
        stop.wait(args.seconds / 2)
        restart_began = time.monotonic()
        postgres.restart()
        restart_window = (restart_began, time.monotonic())
    stop.wait(max(0.0, began + args.seconds - time.monotonic()))
    # The probe stops first, under the full load: what follows, every client and stream ending at once, is the
    # load generator's teardown, not the load the probe measures.
    probe_stop.set()
    health = probe_samples.get(timeout=60)
    probe.join(timeout=60)
    ended = time.monotonic()
    stop.set()
    for thread in clients + threads:
        thread.join(timeout=60)
    time.sleep(max(5.0, 3 * args.run_seconds))  # let the controller finish what the last calls asked
    return {"began": began, "ended": ended, "record": record, "health": health, "rss": rss,
            "restart": restart_window, "facts": facts(db_url, created, refused)}


def facts(db_url: str, created: list[str], refused: list[str]) -> dict:
    """From the database after the run: jobs lost or created although refused, and the controller's lag."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            state_of = dict(conn.execute(select(Job.name, Job.state)).all())
            events = conn.execute(select(Event.job_name, Event.reason, Event.to_state, Event.create_time)
                                  .order_by(Event.id)).all()
    finally:
        engine.dispose()
    created_at: dict[str, datetime] = {}
    first_pass: dict[str, float] = {}  # by job: seconds from its Created event to the next
    cancel_asked: dict[str, datetime] = {}
    cancel_lag: list[float] = []
    cancelled: set[str] = set()
    for job, reason, to_state, at in events:
        if reason == "Created":
            created_at[job] = at
        elif job in created_at and job not in first_pass:
            first_pass[job] = (at - created_at[job]).total_seconds()
        if reason == "CancelRequested" and job not in cancel_asked:
            cancel_asked[job] = at
        elif to_state == "CANCELLED" and job in cancel_asked:
            cancel_lag.append((at - cancel_asked[job]).total_seconds())
            cancelled.add(job)
    start = min((created_at[job] for job in first_pass), default=None)
    by_window: dict[int, list[float]] = defaultdict(list)  # the first passes' lag by 10 s of creation
    for job, lag in first_pass.items():
        by_window[int((created_at[job] - start).total_seconds() // 10)].append(lag)
    names = set(state_of)
    # A cancel that never reached CANCELLED: the job ended otherwise first (a race the user loses, not a fault),
    # or it is still active (a cancel lost).
    cancels_unfinished = Counter(state_of.get(job, "missing") for job in cancel_asked if job not in cancelled)
    return {
        "acknowledged": len(created),
        "first_pass_lag_by_window": {w: sorted(v) for w, v in sorted(by_window.items())},
        "lost": sorted(set(created) - names),
        "created_although_refused": sorted(set(refused) & names),
        "first_pass_lag": sorted(first_pass.values()),
        "never_passed": sum(1 for job in created if job not in first_pass),
        "cancel_lag": sorted(cancel_lag),
        "cancels_unfinished": dict(sorted(cancels_unfinished.items())),
    }


# -- the report --------------------------------------------------------------------------------------------


def quantiles(values: list[float]) -> str:
    """p50, p99 and max of durations in seconds."""
    if not values:
        return "none"
    s = summary(sorted(values))
    return f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms"


def report(args, database: str, result: dict) -> None:
    began, ended, restart = result["began"], result["ended"], result["restart"]
    record: Record = result["record"]

    def in_restart(call_began: float, call_ended: float) -> bool:
        return (restart is not None and call_began <= restart[1] + RESTART_GRACE_SECONDS
                and call_ended >= restart[0])

    by_code: dict[str, Counter] = defaultdict(Counter)
    unintended = Counter()
    for call_began, call_ended, method, code in record.calls:
        by_code[method][code] += 1
        if code == "OK" or (method, code) in EXPECTED_REFUSALS or (
                code == "UNAVAILABLE" and in_restart(call_began, call_ended)):
            continue
        unintended[(method, code)] += 1
    load_avg = os.getloadavg()
    print(f"## Load: {database}, {args.clients} clients, {args.seconds:g} s, {args.watches} watches held open, "
          f"launcher capped at {args.capacity} ranks ({args.run_seconds:g} s attempts) "
          f"+ {ANCHORS} for the watched jobs" + (f"; {args.busy_processes} busy process(es) beside it"
                                                  if args.busy_processes else ""))
    print(f"machine: {platform.node()}, {len(os.sched_getaffinity(0))} cores, load average after the run "
          f"{load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    if restart is not None:
        print(f"PostgreSQL restarted at {restart[0] - began:.1f} s, back after {restart[1] - restart[0]:.1f} s "
              f"(UNAVAILABLE within it and {RESTART_GRACE_SECONDS:g} s after counted apart)")
    print()
    print("| method | calls | by status | OK latency |")
    print("|---|---:|---|---|")
    for method in [m for m, _ in MIX] + ["WatchJob"]:
        codes = by_code.get(method, Counter())
        shown = ", ".join(f"{code} {n}" for code, n in codes.most_common())
        latency = "held open" if method == "WatchJob" else quantiles(record.latencies.get(method, []))
        print(f"| {method} | {sum(codes.values())} | {shown} | {latency} |")
    print()
    total_unintended = sum(unintended.values())
    print(f"unintended errors: {total_unintended}" + (
        " (" + ", ".join(f"{m} {c} {n}" for (m, c), n in unintended.most_common()) + ")" if unintended else ""))
    health = result["health"]
    ok_health = [took for _, took, code in health if code == "OK"]
    windows = defaultdict(list)
    for t, took, code in health:
        windows[int((t - began) // 10)].append(took)
    worst, worst_at = max(((summary(sorted(v))["p99_ms"], k) for k, v in windows.items() if v), default=(0.0, 0))
    failed_health = sum(1 for _, _, code in health if code != "OK")
    print(f"health check: {len(health)} probes, {failed_health} failed; {quantiles(ok_health)}; "
          f"worst 10 s window p99 {worst:.1f} ms ({worst_at * 10}-{worst_at * 10 + 10} s, "
          f"{len(windows[worst_at])} probes)")
    rss = result["rss"]
    if rss:
        def at(fraction: float) -> float:
            t = began + fraction * (ended - began)
            return min(rss, key=lambda sample: abs(sample[0] - t))[1]
        series = ", ".join(f"{int(t - began)} s {mib:.0f}" for t, mib in rss[::max(1, len(rss) // 10)])
        growth = 100 * (at(1.0) - at(0.2)) / at(0.2)
        print(f"server RSS (MiB): {series}; max {max(m for _, m in rss):.0f}; "
              f"growth over the last 80 % of the run {growth:+.1f} %")
    f = result["facts"]
    print(f"controller lag, a new job's first pass: {quantiles(f['first_pass_lag'])}; "
          f"jobs never passed: {f['never_passed']}")
    print("  its p99 by 10 s of creation: " + ", ".join(
        f"{10 * w}-{10 * w + 10} s {summary(v)['p99_ms'] / 1000:.1f} s"
        for w, v in f["first_pass_lag_by_window"].items()))
    print(f"controller lag, cancel to CANCELLED: {quantiles(f['cancel_lag'])}; "
          f"not cancelled, by the job's state at the end: {f['cancels_unfinished'] or 'none'} (a job that ended "
          "otherwise first lost the race to its end; one still active lost the cancel)")
    print("server log: " + ", ".join(f"{n} '{what}' lines" for what, n in result["logged"].items()))
    launcher = result["launcher"]
    print(f"jobs: {f['acknowledged']} created; lost {len(f['lost'])}; created although refused "
          f"{len(f['created_although_refused'])}; launcher: {launcher.get('attempts_launched', 0)} attempts, "
          f"{launcher.get('gangs_overlapping', 0)} overlapping gangs of one job, "
          f"{launcher.get('attempts_launched_again', 0)} launched again, most ranks running "
          f"{launcher.get('most_ranks_running', 0)} of {args.capacity + ANCHORS}")
    samples = max(1, launcher.get("queue_samples", 0))
    print(f"job controller: {launcher.get('controller_passes', 0)} passes, "
          f"{launcher.get('controller_passes', 0) / max(1, f['acknowledged']):.1f} a job created; jobs queued for "
          f"a worker, sampled every second: mean {launcher.get('queue_depth_sum', 0) / samples:.0f}, "
          f"max {launcher.get('queue_depth_max', 0)}; {launcher.get('admission_passes', 0)} admission passes woke "
          f"{launcher.get('admission_woken', 0)} jobs")
    print("server's garbage collections: " + "; ".join(
        f"generation {g} {launcher.get(f'gc{g}_count', 0)}, {launcher.get(f'gc{g}_ms', 0):.0f} ms in all, "
        f"longest {launcher.get(f'gc{g}_max_ms', 0):.1f} ms" for g in range(3)))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--watches", type=int, default=200, help="WatchJob streams held open all run long")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--capacity", type=int, default=8, help="the in-memory launcher's ranks")
    parser.add_argument("--run-seconds", type=float, default=3.0, help="how long each attempt runs")
    parser.add_argument("--no-restart", action="store_true",
                        help="PostgreSQL: the shared server at --postgres, not restarted")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                        help="the shared PostgreSQL (with --no-restart, or when pg_ctl is missing)")
    parser.add_argument("--unary-threads", type=int, default=UNARY_THREADS,
                        help="the server's pool for unary calls (default: the server's own)")
    parser.add_argument("--gc", choices=("tuned", "freeze", "default"), default="tuned",
                        help="the server's garbage collector: tuned as `roundhouse serve` does, start-up frozen "
                             "out of it only, or Python's defaults")
    parser.add_argument("--gc-young", type=int, default=GC_THRESHOLDS[0],
                        help="with --gc tuned: the youngest generation's threshold (default: the server's own)")
    parser.add_argument("--busy-processes", type=int, default=0,
                        help="processes that only take CPU all run long: a machine shared with other work, or "
                             "a slower hour, made on purpose")
    parser.add_argument("--serve", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        home, url, port, capacity, run_seconds, stats, unary_threads, gc_mode, gc_young = args.serve
        serve(Path(home), url, int(port), int(capacity), float(run_seconds), Path(stats), int(unary_threads),
              gc_mode, int(gc_young))
        return
    if args.watches and -(-args.watches // args.clients) > 32:
        parser.error("more than 32 watches a user (the server's default limit): add --clients")

    if args.database == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            report(args, "SQLite", run(args, f"sqlite:///{Path(tmp) / 'load.db'}", None))
        return
    if args.no_restart or not PrivatePostgres.available():
        if not args.no_restart:
            print("pg_ctl not found: the shared PostgreSQL, not restarted")
        url, drop = postgres_schema_url(args.postgres)
        try:
            report(args, "PostgreSQL (shared, not restarted)", run(args, url, None))
        finally:
            drop()
        return
    with tempfile.TemporaryDirectory() as tmp:
        postgres = PrivatePostgres(Path(tmp) / "pg")
        try:
            report(args, "PostgreSQL (private, restarted mid-run)", run(args, postgres.start(), postgres))
        finally:
            postgres.stop()


if __name__ == "__main__":
    main()
