"""Unary calls and the health check while many WatchJob streams are open, against the same calls with none
open, in the same run: what grpc.aio buys (before it, 64 open watches took every worker thread and GetJob
and the health check waited until a stream closed).

A control plane (SQLite, reconciler off) runs as a separate process. One client calls GetJob and the gRPC
health check one after the other, `--calls` times each, first with no stream open, then with `--streams`
WatchJob streams held open by `--users` users (their own tokens, within the per-user limit). It also
reports the server's CPU while the streams sit idle (the cost of watching).

    python -m benchmarks.streams [--streams 200] [--users 8] [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.create_job import process_cpu_seconds
from contract.spec import parse_spec, spec_to_proto
from orchestrator.auth import create_token
from orchestrator.config import default_db_url, token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from orchestrator.store import Database
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

JOBS = 8
IDLE_SECONDS = 5.0


def latencies(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return sorted(out)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * values[len(values) // 2],
            "p99_ms": 1000 * values[min(len(values) - 1, int(len(values) * 0.99))],
            "max_ms": 1000 * values[-1]}


def measure(channel: grpc.Channel, metadata, calls: int) -> dict[str, dict[str, float]]:
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    return {
        "GetJob": summary(latencies(lambda: jobs.GetJob(js.GetJobRequest(name="jobs/w-0"), metadata=metadata,
                                                        timeout=60), calls)),
        "Health": summary(latencies(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=60), calls)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    per_user = -(-args.streams // args.users)
    if per_user > 32:
        parser.error(f"{per_user} streams a user is past the default limit of 32: add --users")

    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        server = spawn_server(Path(home), None, port, reconcile=False)
        channels: list[grpc.Channel] = []
        calls = []
        try:
            admin = [("authorization", f"Bearer {token_file(Path(home)).read_text().strip()}")]
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            jobs = job_service_pb2_grpc.JobServiceStub(channel)
            for index in range(JOBS):
                spec = spec_to_proto(parse_spec({"name": f"w-{index}"}))
                jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=admin, timeout=60)
            db = Database(default_db_url(Path(home)))
            tokens = [create_token(db, f"watcher-{u}", "user") for u in range(args.users)]
            db.dispose()
            measure(channel, admin, 20)  # warm-up
            before = measure(channel, admin, args.calls)

            opened = threading.Semaphore(0)
            for user, token in enumerate(tokens):
                user_channel = grpc.insecure_channel(f"127.0.0.1:{port}")
                channels.append(user_channel)
                stub = job_service_pb2_grpc.JobServiceStub(user_channel)
                for index in range(user, args.streams, args.users):
                    call = stub.WatchJob(js.WatchJobRequest(name=f"jobs/w-{index % JOBS}"),
                                         metadata=[("authorization", f"Bearer {token}")])
                    calls.append(call)

                    def read(call=call) -> None:
                        try:
                            for _ in call:
                                opened.release()
                        except grpc.RpcError:
                            pass

                    threading.Thread(target=read, daemon=True).start()
            for _ in range(args.streams):
                if not opened.acquire(timeout=120):
                    raise SystemExit("the streams did not all open")
            cpu = process_cpu_seconds(server.pid)
            time.sleep(IDLE_SECONDS)
            idle_cpu = (process_cpu_seconds(server.pid) - cpu) / IDLE_SECONDS
            during = measure(channel, admin, args.calls)
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                channel.close()
            server.terminate()
            server.wait()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; SQLite; "
          f"{args.calls} sequential calls of each")
    print(f"{'':8} {'no stream open':>30} {f'{args.streams} WatchJob streams open':>34}  p99 ratio")
    for method in ("GetJob", "Health"):
        a, b = before[method], during[method]
        print(f"{method:8} p50 {a['p50_ms']:6.2f} ms p99 {a['p99_ms']:6.2f} ms    "
              f"p50 {b['p50_ms']:6.2f} ms p99 {b['p99_ms']:6.2f} ms max {b['max_ms']:6.1f} ms  "
              f"{b['p99_ms'] / a['p99_ms']:5.2f}x")
    print(f"server CPU while {args.streams} streams sit idle: {100 * idle_cpu:.1f} % of a core")


if __name__ == "__main__":
    main()
