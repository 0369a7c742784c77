"""CreateJob throughput and latency under 16 concurrent clients, against bare gRPC unary echo servers
measured the same way in the same run: gRPC's threaded server (the issue's baseline) and grpc.aio with a
blocking handler on a small pool (the control plane's own stack since issue 16, so that streams hold no
thread), which tells the cost of the stack apart from the cost of CreateJob's own work.

Every CreateJob is durably committed (SQLite in WAL mode with synchronous=FULL; PostgreSQL with its
default synchronous_commit) before it returns. The reconciler is off so the figures are the API's alone.

    python -m benchmarks.create_job [--seconds 10] [--clients 16] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from sqlalchemy import create_engine, text

from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from orchestrator.server import UNARY_THREADS
from contract.spec import parse_spec, spec_to_proto
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

ECHO_METHOD = "/bench.Echo/Echo"


def echo_server_main(port: int, stack: str) -> None:
    """A bare unary echo, no work. `sync`: gRPC's threaded server with 64 threads (the control plane before
    issue 16, and the issue's baseline). `aio`: the control plane's stack since (grpc.aio, a blocking handler
    on a pool of orchestrator.server.UNARY_THREADS threads). `coroutine`: grpc.aio with the handler a
    coroutine on the loop, no pool (the cheapest call that stack answers; benchmarks/create_job_ceiling.py)."""
    async def echo_coroutine(request, context):
        return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(
        echo_coroutine if stack == "coroutine" else lambda request, context: request)})
    if stack == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return

    async def serve() -> None:
        server = grpc.aio.server() if stack == "coroutine" else grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=UNARY_THREADS))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def process_times(pid: int) -> tuple[float, float]:
    """The process's CPU seconds so far: in its own code, in the kernel on its behalf."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    return sum(process_times(pid))


def _server_counters(pids: list[int]) -> tuple[float, float, int]:
    """CPU seconds in their own code and in the kernel, and context switches, summed over `pids`."""
    times = [process_times(pid) for pid in pids]
    return (sum(user for user, _ in times), sum(kernel for _, kernel in times),
            sum(context_switches(pid) for pid in pids))


def context_switches(pid: int) -> int:
    """How often the process's threads have left the CPU so far, waiting (for the GIL, a lock, a socket) or
    preempted: each is a trip through the scheduler (the kernel's share of a call's CPU)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


SERVER_COLUMNS = "server CPU ms/request | of it in the kernel | server context switches/request"


def server_cells(result: dict) -> str:
    """A row's SERVER_COLUMNS, from run_load's figures."""
    return (f"{result['server_cpu_ms']:.3f} | {result['server_kernel_share']:.0%} | "
            f"{result['server_switches']:.1f}")


def run_load(call, clients: int, seconds: float, server_pids: list[int]) -> dict:
    """`clients` threads call back-to-back for `seconds` (after a short warm-up); returns the figures: the
    servers' CPU per request summed over `server_pids`, and this process's (the clients')."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    warmed_up = threading.Barrier(clients + 1)
    go = threading.Event()
    stop_at = [0.0]

    def worker(i: int) -> None:
        for j in range(20):  # warm-up: connections, caches
            call(i, -j - 1)
        warmed_up.wait()
        go.wait()
        n = 0
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            call(i, n)
            latencies[i].append(time.perf_counter() - t0)
            n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    warmed_up.wait()
    server_before = _server_counters(server_pids)
    client_cpu = time.process_time()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    user, kernel, switches = (after - before for after, before in zip(_server_counters(server_pids), server_before))
    client_cpu = time.process_time() - client_cpu
    flat = sorted(x for per in latencies for x in per)
    return {
        "requests": len(flat),
        "throughput": len(flat) / elapsed,
        "p50_ms": 1000 * flat[len(flat) // 2],
        "p99_ms": 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))],
        "mean_ms": 1000 * statistics.fmean(flat),
        "server_cpu_ms": 1000 * (user + kernel) / len(flat),
        "server_kernel_share": kernel / (user + kernel) if user + kernel else 0.0,
        "server_switches": switches / len(flat),
        "client_cpu_ms": 1000 * client_cpu / len(flat),
    }


def bench_echo(clients: int, seconds: float, payload: bytes, stack: str) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.create_job", "--echo-server", str(port), stack],
                            cwd=Path(__file__).resolve().parents[1])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        echo = channel.unary_unary(ECHO_METHOD)
        return run_load(lambda i, n: echo(payload, timeout=30), clients, seconds, [proc.pid])
    finally:
        proc.kill()
        proc.wait()


def bench_create_job(db_url: str | None, clients: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        proc = spawn_server(Path(home), db_url, port, reconcile=False)
        try:
            token = token_file(Path(home)).read_text().strip()
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            metadata = [("authorization", f"Bearer {token}")]
            base = spec_to_proto(parse_spec({"name": "bench", "labels": {"bench": "create-job"}}))
            run_id = uuid.uuid4().hex[:6]

            def create(i: int, n: int) -> None:
                spec = js.CreateJobRequest(spec=base).spec
                spec.name = f"b{run_id}-{i}-{n + 100}"
                stub.CreateJob(js.CreateJobRequest(spec=spec), metadata=metadata, timeout=30)

            return run_load(create, clients, seconds, [proc.pid])
        finally:
            proc.terminate()
            proc.wait()


def postgres_schema_url(base_url: str) -> tuple[str, callable]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    return f"{base_url}?options=-csearch_path%3D{schema}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                        help="PostgreSQL URL ('' to skip)")
    parser.add_argument("--echo-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server_main(int(args.echo_server[0]), args.echo_server[1])
        return

    payload = js.CreateJobRequest(spec=spec_to_proto(parse_spec({"name": "b-0-0"}))).SerializeToString()
    results = {"echo (baseline)": bench_echo(args.clients, args.seconds, payload, "sync"),
               "echo, grpc.aio as the control plane": bench_echo(args.clients, args.seconds, payload, "aio")}
    results["CreateJob, SQLite"] = bench_create_job(None, args.clients, args.seconds)
    if args.postgres:
        url, drop = postgres_schema_url(args.postgres)
        try:
            results["CreateJob, PostgreSQL"] = bench_create_job(url, args.clients, args.seconds)
        finally:
            drop()

    echo = results["echo (baseline)"]["throughput"]
    print(f"CreateJob benchmark: {args.clients} concurrent clients, {args.seconds:.0f} s each, "
          f"{platform.node()} ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
    same_stack = results["echo, grpc.aio as the control plane"]["throughput"]
    print(f"| server | requests | req/s | vs echo | vs grpc.aio echo | p50 ms | p99 ms | {SERVER_COLUMNS} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['requests']} | {r['throughput']:.0f} | {r['throughput'] / echo:.2f}x | "
              f"{r['throughput'] / same_stack:.2f}x | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {server_cells(r)} |")


if __name__ == "__main__":
    main()
