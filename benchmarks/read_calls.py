"""GetJob and ListJobs under 16 concurrent clients, against the threaded gRPC echo measured the same way in
the same run (benchmarks/create_job.py's baseline): what a dashboard or a script polling jobs costs the server.

The server holds `--jobs` jobs with two labels and one attempt each (written straight to its database before
it starts; the reconciler is off). GetJob reads one of them; ListJobs a page of 20 (the basic view, as
`roundhouse list` asks for it). Each row gives the server's CPU per call, its share in the kernel and its
threads' context switches per call.

    python -m benchmarks.read_calls [--seconds 10] [--clients 16] [--jobs 60] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import uuid
from pathlib import Path

import grpc

from benchmarks.create_job import SERVER_COLUMNS, bench_echo, postgres_schema_url, run_load, server_cells
from contract.spec import parse_spec, spec_to_proto
from orchestrator.auth import ensure_admin_token
from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from orchestrator.store import Attempt, AttemptState, Database, Job, JobLabel, JobState, migrate, utcnow
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

PAGE = 20


def store_jobs(db_url: str, home: Path, count: int) -> None:
    db = Database(db_url)
    try:
        migrate(db)
        ensure_admin_token(db, home)
        with db.session() as session:
            for i in range(count):
                name, now = f"r{i}", utcnow()
                session.add(Job(name=name, uid=str(uuid.uuid4()), spec={"name": name}, state=JobState.RUNNING,
                                owner="root", total_steps=10, create_time=now, update_time=now,
                                labels=[JobLabel(job_name=name, key="team", value="infra"),
                                        JobLabel(job_name=name, key="run", value=str(i))],
                                attempts=[Attempt(job_name=name, number=1, state=AttemptState.RUNNING, tp=1, pp=1,
                                                  dp=1, world_size=1)]))
    finally:
        db.dispose()


def bench_reads(db_url: str, clients: int, seconds: float, jobs: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as home:
        store_jobs(db_url, Path(home), jobs)
        port = free_port()
        proc = spawn_server(Path(home), db_url, port, reconcile=False)
        try:
            metadata = [("authorization", f"Bearer {token_file(Path(home)).read_text().strip()}")]
            stub = job_service_pb2_grpc.JobServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            get = js.GetJobRequest(name="jobs/r0")
            listing = js.ListJobsRequest(page_size=PAGE)
            return {
                "GetJob": run_load(lambda i, n: stub.GetJob(get, metadata=metadata, timeout=30), clients, seconds,
                                   [proc.pid]),
                f"ListJobs, a page of {PAGE}": run_load(
                    lambda i, n: stub.ListJobs(listing, metadata=metadata, timeout=30), clients, seconds, [proc.pid]),
            }
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                        help="PostgreSQL URL ('' to skip)")
    args = parser.parse_args()

    payload = js.GetJobRequest(name="jobs/r0").SerializeToString()
    rows = {"echo (baseline)": bench_echo(args.clients, args.seconds, payload, "sync")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, r in bench_reads(f"sqlite:///{Path(tmp) / 'reads.db'}", args.clients, args.seconds,
                                   args.jobs).items():
            rows[f"{name}, SQLite"] = r
    if args.postgres:
        url, drop = postgres_schema_url(args.postgres)
        try:
            for name, r in bench_reads(url, args.clients, args.seconds, args.jobs).items():
                rows[f"{name}, PostgreSQL"] = r
        finally:
            drop()

    echo = rows["echo (baseline)"]["throughput"]
    print(f"Read calls: {args.clients} concurrent clients, {args.seconds:.0f} s each, {args.jobs} jobs stored, "
          f"{platform.node()} ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
    print(f"| call | req/s | vs echo | p50 ms | p99 ms | {SERVER_COLUMNS} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['throughput']:.0f} | {r['throughput'] / echo:.2f}x | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {server_cells(r)} |")


if __name__ == "__main__":
    main()
