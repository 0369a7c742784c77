"""Does the job controller keep up with admission? 16 clients create 3,000 jobs as fast as CreateJob takes
them, against a launcher capped at a few ranks, so nearly every job is planned, finds no room and waits.

A job is "evaluated" once the controller's first pass over it wrote its outcome (its first event after
"Created": WaitingForRanks, or AttemptCreated for the few that fit). From the moment the load starts:

    CreateJob throughput   = jobs / seconds until the last CreateJob returned
    controller throughput  = jobs / seconds until the last job was evaluated once
    ratio                  = controller ÷ CreateJob (>= 1.0: every job was evaluated by the time the load ended)

The control plane runs in its own process with an in-memory launcher (no rank processes), so the figures
are the control plane's own; the clients run in this process.

    python -m benchmarks.controller_throughput [--jobs 3000] [--clients 16] [--workers 4] [--repeats 1]
                                               [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
from sqlalchemy import create_engine, func, select

from contract.spec import parse_spec, spec_to_proto
from orchestrator.config import token_file
from orchestrator.launcher import AttemptRef, AttemptStatus, LaunchRequest, Phase
from orchestrator.launcher.local import free_port
from orchestrator.process import wait_healthy
from orchestrator.store import Event
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

from benchmarks.create_job import postgres_schema_url, process_cpu_seconds

CAPACITY = 4  # ranks: four one-rank jobs run, the rest wait


class CappedLauncher:
    """The Launcher protocol in memory, with room for CAPACITY ranks: a launched attempt runs until stopped."""

    def subscribe(self, notify) -> None:
        pass

    def capacity(self) -> int:
        return CAPACITY

    def launch(self, request: LaunchRequest) -> dict:
        return {"fake": request.attempt}

    def status(self, ref: AttemptRef) -> AttemptStatus:
        return AttemptStatus(Phase.RUNNING)

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        pass

    def ranks_gone(self, ref: AttemptRef) -> bool:
        return True

    def close(self) -> None:
        pass

    data_roots: tuple[str, ...] = ()

    def directory_violations(self, spec) -> list:
        return []

    def logs(self, ref, rank, follow, attempt_ended):
        return iter(())


def serve(home: Path, db_url: str | None, port: int, workers: int) -> None:
    """The control plane with the capped launcher, until SIGTERM (run as a separate process)."""
    from orchestrator import server
    from orchestrator.server import ControlPlane, ServerSettings

    server.create_launcher = lambda settings: CappedLauncher()  # in place of the registry's launchers
    plane = ControlPlane(ServerSettings(home=home, db_url=db_url, grpc_port=port, http_port=0,
                                             controller_workers=workers))
    plane.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    plane.stop()


def run_once(db_url: str | None, jobs: int, clients: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        url = db_url or f"sqlite:///{home / 'roundhouse.db'}"
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "benchmarks.controller_throughput", "--serve", str(home), url,
                                   str(port), str(workers)], cwd=Path(__file__).resolve().parents[1])
        try:
            wait_healthy(f"127.0.0.1:{port}", timeout=60, process=server)
            return _load(home, url, port, jobs, clients, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)


def _load(home: Path, url: str, port: int, jobs: int, clients: int, server_pid: int) -> dict:
    token = token_file(home).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")]
    base = spec_to_proto(parse_spec({"name": "bench", "labels": {"bench": "controller"}}))
    run_id = uuid.uuid4().hex[:6]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [job_service_pb2_grpc.JobServiceStub(c) for c in channels]
    for stub in stubs:  # connections up before the clock starts
        stub.ListJobs(js.ListJobsRequest(page_size=1), metadata=metadata, timeout=30)
    go = threading.Barrier(clients + 1)
    ended = [0.0] * clients

    def client(i: int) -> None:
        go.wait()
        for n in range(i, jobs, clients):
            spec = js.CreateJobRequest(spec=base).spec
            spec.name = f"c{run_id}-{n}"
            stubs[i].CreateJob(js.CreateJobRequest(spec=spec), metadata=metadata, timeout=60)
        ended[i] = time.time()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    cpu_before = process_cpu_seconds(server_pid)
    go.wait()
    began = time.time()
    for t in threads:
        t.join()
    created_at = max(ended)
    for c in channels:
        c.close()

    # Each job's first evaluation: its first event after "Created", in the server's clock (the same machine's).
    engine = create_engine(url)
    first_eval = select(Event.job_name, func.min(Event.create_time)).where(Event.reason != "Created") \
        .group_by(Event.job_name)
    deadline = time.monotonic() + 600
    try:
        while True:
            with engine.connect() as conn:
                evaluated = dict(conn.execute(first_eval).all())
            if len(evaluated) >= jobs or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        engine.dispose()
    server_cpu = process_cpu_seconds(server_pid) - cpu_before
    if len(evaluated) < jobs:
        raise RuntimeError(f"only {len(evaluated)} of {jobs} jobs were evaluated within 600 s")
    times = sorted(t.replace(tzinfo=UTC).timestamp() for t in evaluated.values())
    evaluated_at = times[-1]
    return {
        "create_per_s": jobs / (created_at - began),
        "controller_per_s": jobs / (evaluated_at - began),
        "ratio": (created_at - began) / (evaluated_at - began),
        "create_s": created_at - began,
        "evaluated_s": evaluated_at - began,
        "evaluated_when_load_ended": sum(1 for t in times if t <= created_at),
        "server_cpu_s": server_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4, help="the controller's workers (ServerSettings)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per database, interleaved")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                        help="PostgreSQL URL ('' to skip)")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        home, url, port, workers = args.serve
        serve(Path(home), url, int(port), int(workers))
        return

    databases = ["SQLite"] + (["PostgreSQL"] if args.postgres else [])
    results: dict[str, list[dict]] = {name: [] for name in databases}
    for _ in range(args.repeats):
        for name in databases:
            if name == "SQLite":
                results[name].append(run_once(None, args.jobs, args.clients, args.workers))
            else:
                url, drop = postgres_schema_url(args.postgres)
                try:
                    results[name].append(run_once(url, args.jobs, args.clients, args.workers))
                finally:
                    drop()

    print(f"Controller throughput: {args.jobs} jobs from {args.clients} clients, launcher capped at {CAPACITY} "
          f"ranks, {args.workers} controller workers, {platform.node()} "
          f"({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores), "
          f"{datetime.now(UTC):%Y-%m-%d}")
    print("| database | CreateJob jobs/s | controller jobs/s | controller ÷ CreateJob | evaluated when the load "
          "ended | last evaluated after the load | server CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        for r in runs:
            print(f"| {name} | {r['create_per_s']:.0f} | {r['controller_per_s']:.0f} | {r['ratio']:.2f}x | "
                  f"{r['evaluated_when_load_ended']} of {args.jobs} | {r['evaluated_s'] - r['create_s']:.2f} s | "
                  f"{r['server_cpu_s']:.1f} |")
        if len(runs) > 1:
            ratios = [r["ratio"] for r in runs]
            print(f"| {name}: median of {len(runs)} | | | {statistics.median(ratios):.2f}x "
                  f"(spread {min(ratios):.2f}–{max(ratios):.2f}) | | | |")


if __name__ == "__main__":
    main()
