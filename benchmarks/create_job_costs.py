"""What one CreateJob costs, piece by piece: each step of the handler timed alone in this process (CPU time
of one thread, no other thread running), against the server's whole CPU per CreateJob under 16 clients
measured in the same run (benchmarks/create_job.py's load). What the pieces do not add up to is the rest of
the call: gRPC's stack, the interceptors (metrics, internal errors, tokens), the hand-offs between the event
loop, the pool's threads and the job writer, and the GIL they share.

The group commit is timed as the writer thread runs it, on batches of 16 jobs (16 clients' calls), per job;
its fsync is wall time, not CPU, so it is not in the figures.

    python -m benchmarks.create_job_costs [--calls 2000] [--seconds 10] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

from benchmarks.create_job import bench_create_job, postgres_schema_url
from contract.reach import reach_violations
from contract.spec import parse_spec, spec_from_proto, spec_to_proto
from orchestrator.launcher.local import LocalLauncher
from orchestrator.service import jobs
from orchestrator.service.limits import Limits
from orchestrator.store import Database, migrate
from orchestrator.store.job_writer import JobWriter
from roundhouse.v1 import job_pb2, job_service_pb2 as js

BATCH = 16  # the load's clients: about one batch in flight per client at a time


def cpu_microseconds(step, calls: int) -> float:
    """`step(i)` for i in range(calls), after a warm-up; this thread's CPU time per call."""
    for i in range(min(100, calls)):
        step(-i - 1)
    began = time.thread_time()
    for i in range(calls):
        step(i)
    return 1e6 * (time.thread_time() - began) / calls


def handler_pieces(calls: int, runs_dir: Path) -> dict[str, float]:
    """The handler's own steps, in the order CreateJob takes them (orchestrator/api/job_service.py)."""
    base = js.CreateJobRequest(spec=spec_to_proto(parse_spec({"name": "bench", "labels": {"bench": "costs"}})))
    payload = base.SerializeToString()
    request = js.CreateJobRequest.FromString(payload)
    spec = spec_from_proto(request.spec)
    launcher = LocalLauncher(runs_dir)
    limits = Limits()

    def answer(i: int) -> bytes:
        return job_pb2.Job(name=f"jobs/{spec.name}", uid="u", spec=spec_to_proto(spec), state=job_pb2.JOB_STATE_QUEUED,
                           state_reason="Created", owner="alice", total_steps=spec.training.steps).SerializeToString()

    return {
        "decode the request": cpu_microseconds(lambda i: js.CreateJobRequest.FromString(payload), calls),
        "check the spec (`spec_from_proto`)": cpu_microseconds(lambda i: spec_from_proto(request.spec), calls),
        "what it may reach, the operator's limits, its directory": cpu_microseconds(
            lambda i: (reach_violations(spec, launcher.data_roots, False) + limits.violations(spec)
                       + launcher.directory_violations(spec)), calls),
        "the job's rows (`new_job`)": cpu_microseconds(lambda i: jobs.new_job(spec, "alice"), calls),
        "the answer (the Job, encoded)": cpu_microseconds(answer, calls),
    }


def group_commit_per_job(db_url: str, calls: int) -> float:
    """The job writer's transaction (one batch of BATCH jobs: names checked, three multi-row INSERTs, the
    commit), CPU per job, as its thread runs it."""
    db = Database(db_url)
    migrate(db)
    writer = JobWriter(db)
    try:
        run = uuid.uuid4().hex[:6]
        spec = parse_spec({"name": "bench", "labels": {"bench": "costs"}})
        batches = max(1, calls // BATCH)

        def batch(b: int) -> list[tuple]:
            return [(jobs.new_job(spec.model_copy(update={"name": f"c{run}-{b}-{i}"}), "alice"), Future())
                    for i in range(BATCH)]

        ready = [batch(b) for b in range(-10, batches)]
        for b in range(10):
            writer._commit(ready[b])  # warm-up (the thread's own method: the step itself, without its queue)
        began = time.thread_time()
        for b in range(10, len(ready)):
            writer._commit(ready[b])
        return 1e6 * (time.thread_time() - began) / (batches * BATCH)
    finally:
        writer.close()
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls of each piece")
    parser.add_argument("--seconds", type=float, default=10.0, help="of the 16-client load on the server")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                        help="PostgreSQL URL ('' to skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pieces = handler_pieces(args.calls, Path(tmp) / "runs")
        databases = {"SQLite": f"sqlite:///{Path(tmp) / 'costs.db'}"}
        drops = []
        if args.postgres:
            url, drop = postgres_schema_url(args.postgres)
            databases["PostgreSQL"] = url
            drops.append(drop)
        try:
            commits = {name: group_commit_per_job(url, args.calls) for name, url in databases.items()}
            servers = {name: 1000 * bench_create_job(None if name == "SQLite" else url, BATCH,
                                                     args.seconds)["server_cpu_ms"]
                       for name, url in databases.items()}
        finally:
            for drop in drops:
                drop()

    print(f"CreateJob's costs, CPU microseconds per call: {platform.node()} "
          f"({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
    names = list(databases)
    print("| piece | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for piece, micros in pieces.items():
        print(f"| {piece} | " + " | ".join(f"{micros:.0f}" for _ in names) + " |")
    print("| group commit, per job of a 16-job batch | " + " | ".join(f"{commits[n]:.0f}" for n in names) + " |")
    alone = {n: sum(pieces.values()) + commits[n] for n in names}
    print("| **the pieces together** | " + " | ".join(f"**{alone[n]:.0f}**" for n in names) + " |")
    print(f"| the server's CPU per CreateJob, {BATCH} clients for {args.seconds:g} s | "
          + " | ".join(f"{servers[n]:.0f}" for n in names) + " |")
    print("| the rest: gRPC's stack, interceptors, hand-offs, the GIL | "
          + " | ".join(f"{servers[n] - alone[n]:.0f} ({(servers[n] - alone[n]) / servers[n]:.0%})" for n in names)
          + " |")


if __name__ == "__main__":
    main()
