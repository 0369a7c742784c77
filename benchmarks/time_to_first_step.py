"""Time from CreateJob to the first rank reporting step 1, for the tiny example, split into phases read
from the job's own events: queued -> launching (reconciler picks it up), launching -> ranks started,
ranks started -> first step reported (interpreter start, imports, process group, model, first step).

    python -m benchmarks.time_to_first_step [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from contract.spec import load_spec_file, spec_to_proto
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc

import grpc

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny-gpt.yaml"


def one_run(stub, metadata, name: str) -> dict[str, float]:
    spec = load_spec_file(str(EXAMPLE))
    spec.name = name
    t0 = time.time()
    stub.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=metadata, timeout=30)
    marks: dict[str, float] = {}
    for update in stub.WatchJob(js.WatchJobRequest(name=f"jobs/{name}"), metadata=metadata, timeout=300):
        for event in update.events:
            marks.setdefault(event.reason, event.create_time.ToDatetime().timestamp())
        if any(m.step >= 1 for m in update.metrics):
            marks["FirstStep"] = time.time()
            break
    stub.CancelJob(js.CancelJobRequest(name=f"jobs/{name}"), metadata=metadata, timeout=30)
    return {
        "picked up": marks["AttemptCreated"] - t0,
        "ranks started": marks["RanksStarted"] - marks["AttemptCreated"],
        "to first step": marks["FirstStep"] - marks["RanksStarted"],
        "total": marks["FirstStep"] - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        server = spawn_server(Path(home), None, port)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            metadata = [("authorization", f"Bearer {token_file(Path(home)).read_text().strip()}")]
            runs = []
            for i in range(args.runs):
                runs.append(one_run(stub, metadata, f"ttfs-{i}"))
                time.sleep(2)  # let the cancelled ranks go before the next run
        finally:
            server.terminate()
            server.wait()
    print(f"Time from CreateJob to step 1 reported, {EXAMPLE.name} (2 ranks), median of {args.runs}, "
          f"{platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
    print("| phase | seconds |")
    print("|---|---:|")
    for phase in runs[0]:
        print(f"| {phase} | {statistics.median(r[phase] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
