"""Starting a control plane as a separate process and waiting until it serves: for the demo, the
benchmarks and the tests that kill it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def spawn_server(home: Path, db_url: str | None, grpc_port: int, http_port: int = 0,
                 reconcile: bool = True, log_path: Path | None = None,
                 max_ranks: int | None = None, allow_test_hooks: bool = False) -> subprocess.Popen:
    code = ("from pathlib import Path; from orchestrator.server import ServerSettings, run_server; "
            f"run_server(ServerSettings(home=Path({str(home)!r}), db_url={db_url!r}, grpc_port={grpc_port}, "
            f"http_port={http_port}, reconcile={reconcile!r}, max_ranks={max_ranks!r}, "
            f"allow_test_hooks={allow_test_hooks!r}))")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"127.0.0.1:{grpc_port}", timeout=60, process=proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc


def wait_healthy(address: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Returns once the gRPC health service at `address` answers SERVING."""
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the control plane exited with code {process.returncode}")
            try:
                response = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise TimeoutError(f"no healthy control plane at {address} after {timeout:.0f} s")
    finally:
        channel.close()


if __name__ == "__main__":  # python -m orchestrator.process ADDRESS: wait until it serves
    try:
        wait_healthy(sys.argv[1])
    except (TimeoutError, RuntimeError) as exc:
        sys.exit(str(exc))
