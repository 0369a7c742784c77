"""How far CreateJob could go on this machine: the routes to issue 16's goal (CreateJob at >= 0.5x the
threaded gRPC echo at 16 clients) measured against that echo in one run.

- The echo, as benchmarks/create_job.py measures it (16 client threads on one channel), and with a channel
  per client (the connections a second server process would need to get any of them).
- A grpc.aio echo whose handler is a coroutine: the cheapest call the control plane's stack can answer.
- CreateJob's pieces one at a time on one thread (benchmarks/create_job_costs.py: the handler's steps, and
  the group commit per job of a 16-job batch, SQLite): its work with no thread, queue or stack around it.
- CreateJob's own path without gRPC: its handler called by UNARY_THREADS threads of this process, with the
  real job writer and its group commit on SQLite. No stack in front of it can make it faster than this.
- CreateJob on PostgreSQL served by 1, 2 and 3 control-plane processes sharing the port (SO_REUSEPORT; the
  API only, no controllers: a what-if, not a supported deployment), a channel per client. Their CPU per
  call, summed over the processes, says whether a second process lowers what a call costs or only spreads it.

Every row gives the CPU per call of the server side (the server processes; for the in-process row, this
process) and of the clients. The machine's cores are shared by both, so cores / (server + client CPU per call)
bounds the calls per second a row could reach with the machine to itself; for the in-process row, whose
Python runs on one core at a time (the GIL) and which has no clients, 1 / its CPU per call. The server's share
of CPU spent in the kernel and its threads' context switches per call (voluntary: waiting for the GIL, a
lock, the socket; or preempted) say how much of its CPU goes to handing work between threads.

    python -m benchmarks.create_job_ceiling [--seconds 10] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import grpc

from benchmarks.create_job import ECHO_METHOD, bench_echo, postgres_schema_url, run_load
from benchmarks.create_job_costs import group_commit_per_job, handler_pieces
from contract.spec import parse_spec, spec_to_proto
from orchestrator.api.job_service import JobService
from orchestrator.api.streams import Streams
from orchestrator.auth import UserTokens, ensure_admin_token
from orchestrator.config import token_file
from orchestrator.launcher.local import LocalLauncher, free_port
from orchestrator.process import wait_healthy
from orchestrator.server import UNARY_THREADS
from orchestrator.store import Database, migrate
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

CLIENTS = 16
REPO = Path(__file__).resolve().parents[1]


def channels(port: int, count: int) -> list[grpc.Channel]:
    # A subchannel pool per channel: otherwise gRPC shares one connection among channels to one address.
    made = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]
    for channel in made:
        grpc.channel_ready_future(channel).result(timeout=30)
    return made


def bench_echo_per_client(payload: bytes, seconds: float, server: str) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.create_job", "--echo-server", str(port), server],
                            cwd=REPO)
    try:
        stubs = [channel.unary_unary(ECHO_METHOD) for channel in channels(port, CLIENTS)]
        return run_load(lambda i, n: stubs[i](payload, timeout=30), CLIENTS, seconds, [proc.pid])
    finally:
        proc.kill()
        proc.wait()


def bench_handler_in_process(seconds: float) -> dict:
    """CreateJob's handler called directly by UNARY_THREADS threads (no gRPC), SQLite, the real job writer."""
    with tempfile.TemporaryDirectory() as home:
        db = Database(f"sqlite:///{home}/roundhouse.db")
        migrate(db)
        ensure_admin_token(db, Path(home))
        metadata = (("authorization", f"Bearer {token_file(Path(home)).read_text().strip()}"),)
        users = UserTokens(db)
        service = JobService(db, users, LocalLauncher(Path(home) / "runs"), lambda name: None,
                             Streams(users, executor=None))

        class Context:  # what the handler asks of a gRPC context on its way to a created job
            def invocation_metadata(self):
                return metadata

            def abort(self, code, details):
                raise RuntimeError(f"{code}: {details}")

        base = spec_to_proto(parse_spec({"name": "bench", "labels": {"bench": "ceiling"}}))
        run = uuid.uuid4().hex[:6]

        def create(i: int, n: int) -> None:
            request = js.CreateJobRequest(spec=base)
            request.spec.name = f"c{run}-{i}-{n + 100}"
            service.CreateJob(request, Context())

        try:  # UNARY_THREADS callers, as the server's pool would run them; this process is the server
            result = run_load(create, UNARY_THREADS, seconds, [os.getpid()])
        finally:
            db.dispose()
        result["client_cpu_ms"] = 0.0  # what run_load counts as its clients' is the server's own, above
        result["cores"] = 1  # one process: its Python runs on one core at a time (the GIL)
        return result


def spawn_api_process(home: Path, db_url: str, port: int) -> subprocess.Popen:
    """A control plane with the controllers off whose gRPC port may be shared (SO_REUSEPORT): for this
    measurement only; the server itself refuses a shared port."""
    code = ("import grpc, orchestrator.server as server\n"
            "from pathlib import Path\n"
            "aio_server = grpc.aio.server\n"
            "grpc.aio.server = lambda *a, options=(), **k: aio_server(*a, options=[('grpc.so_reuseport', 1)], **k)\n"
            f"server.run_server(server.ServerSettings(home=Path({str(home)!r}), db_url={db_url!r}, "
            f"grpc_port={port}, http_port=0, reconcile=False))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_healthy(f"127.0.0.1:{port}", timeout=60, process=proc)
    return proc


def bench_create_job_processes(db_url: str, processes: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        procs: list[subprocess.Popen] = []
        try:
            for _ in range(processes):  # one at a time: the first migrates and makes the admin token
                procs.append(spawn_api_process(Path(home), db_url, port))
            metadata = [("authorization", f"Bearer {token_file(Path(home)).read_text().strip()}")]
            stubs = [job_service_pb2_grpc.JobServiceStub(channel) for channel in channels(port, CLIENTS)]
            base = spec_to_proto(parse_spec({"name": "bench", "labels": {"bench": "ceiling"}}))
            run = uuid.uuid4().hex[:6]

            def create(i: int, n: int) -> None:
                request = js.CreateJobRequest(spec=base)
                request.spec.name = f"p{run}-{i}-{n + 100}"
                stubs[i].CreateJob(request, metadata=metadata, timeout=30)

            return run_load(create, CLIENTS, seconds, [p.pid for p in procs])
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                        help="PostgreSQL URL ('' to skip the rows with several processes)")
    args = parser.parse_args()

    payload = js.CreateJobRequest(spec=spec_to_proto(parse_spec({"name": "b-0-0"}))).SerializeToString()
    rows: dict[str, dict] = {}
    shared = bench_echo(CLIENTS, args.seconds, payload, "sync")  # benchmarks/create_job.py's baseline
    rows["threaded echo, one channel (the baseline)"] = shared
    rows["threaded echo, a channel per client"] = bench_echo_per_client(payload, args.seconds, "sync")
    rows["grpc.aio echo, handler a coroutine, a channel per client"] = bench_echo_per_client(
        payload, args.seconds, "coroutine")
    with tempfile.TemporaryDirectory() as tmp:
        pieces = sum(handler_pieces(2000, Path(tmp) / "runs").values())
        pieces += group_commit_per_job(f"sqlite:///{Path(tmp) / 'costs.db'}", 2000)
    # No clients and no concurrency: the CPU per call is the work's, and allows 1 / it calls a second.
    rows["CreateJob's pieces one at a time, one thread, SQLite"] = {
        "throughput": None, "server_cpu_ms": pieces / 1000, "client_cpu_ms": 0.0, "cores": 1,
        "server_kernel_share": None, "server_switches": None}
    rows[f"CreateJob's handler without gRPC, {UNARY_THREADS} threads, SQLite"] = bench_handler_in_process(args.seconds)
    if args.postgres:
        for processes in (1, 2, 3):
            url, drop = postgres_schema_url(args.postgres)
            try:
                rows[f"CreateJob, PostgreSQL, {processes} process{'es' if processes > 1 else ''}, "
                     "a channel per client"] = bench_create_job_processes(url, processes, args.seconds)
            finally:
                drop()

    cores = len(os.sched_getaffinity(0))
    baseline = shared["throughput"]
    print(f"CreateJob's ceiling: {CLIENTS} clients, {args.seconds:.0f} s a row, {platform.node()} "
          f"({platform.processor() or platform.machine()}, {cores} cores)")
    print("| row | calls/s | vs threaded echo | server CPU ms/call | of it in the kernel | server context "
          "switches/call | client CPU ms/call | calls/s its CPU allows | that vs threaded echo |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        limit = r.get("cores", cores) / ((r["server_cpu_ms"] + r["client_cpu_ms"]) / 1000)
        measured = " | " if r["throughput"] is None else f"{r['throughput']:.0f} | {r['throughput'] / baseline:.2f}x"
        switching = (" | " if r["server_switches"] is None else
                     f"{r['server_kernel_share']:.0%} | {r['server_switches']:.1f}")
        print(f"| {name} | {measured} | {r['server_cpu_ms']:.3f} | {switching} | {r['client_cpu_ms']:.3f} | "
              f"{limit:.0f} | {limit / baseline:.2f}x |")


if __name__ == "__main__":
    main()
