"""A µP sweep end to end through the real control plane and the local launcher: two learning rates at a tiny
width, the control plane killed (SIGKILL) while the first trial trains and started again, then the target with
the chosen learning rate to SUCCEEDED. Nothing is duplicated: the sweep owns exactly its two trials and its
target, each launched once (the restarted control plane adopted the running trial's ranks)."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from contract.sweep import parse_sweep, sweep_to_proto
from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from roundhouse.v1 import job_pb2, job_service_pb2 as js, sweep_pb2, sweep_service_pb2 as ss, sweep_service_pb2_grpc
from tests.support.waiting import DEADLINE

from tests.conftest import Client, processes_of

pytestmark = pytest.mark.slow

TINY = {"layers": 1, "hidden_size": 32, "heads": 2, "seq_length": 32, "mup": {"base_hidden_size": 32}}
TRAINING = {"steps": 12, "global_batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "lr_schedule": "constant",
            "eval_interval": 4}
# One OpenMP thread per rank: a lone rank's second thread only spins against the other processes on two cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SWEEP = {
    "name": "e2e",
    "proxy": {"model": TINY, "parallelism": {"dp": 1}, "training": TRAINING, "env": ONE_THREAD},
    "target": {"model": {**TINY, "hidden_size": 64}, "parallelism": {"dp": 1}, "training": {**TRAINING, "steps": 8},
               "env": ONE_THREAD},
    "grid": {"learning_rates": [0.01, 0.002]},
    "max_parallel": 1,
    "objective": {"eval_windows": 2},
}


def get_sweep(client: Client, sweeps) -> sweep_pb2.Sweep:
    return sweeps.GetSweep(ss.GetSweepRequest(name="sweeps/e2e"), metadata=client.metadata)


def wait_for(what: str, check, timeout: float = DEADLINE):
    """`check()`'s first true value; a control plane coming back (UNAVAILABLE) is waited for too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"never got there: {what}")


def test_a_sweep_runs_its_trials_then_the_target_across_a_control_plane_kill(tmp_path):
    home, port = tmp_path / "home", free_port()
    log = tmp_path / "server.log"
    server = spawn_server(home, None, port, log_path=log)
    try:
        client = Client(f"127.0.0.1:{port}", token_file(home).read_text().strip())
        sweeps = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
        spec, _ = parse_sweep(SWEEP)
        created = sweeps.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)), metadata=client.metadata)
        assert created.state == sweep_pb2.SWEEP_STATE_TUNING and len(created.trials) == 2

        # Kill the control plane while the first trial trains and the second is not created yet.
        running = wait_for("trial 0 running", lambda: (s := get_sweep(client, sweeps)).trials[0].state
                           == job_pb2.JOB_STATE_RUNNING and s)
        assert running.trials[1].state == job_pb2.JOB_STATE_UNSPECIFIED  # max_parallel 1: not created yet
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = spawn_server(home, None, port, log_path=log)

        done = wait_for("the sweep ended", lambda: (s := get_sweep(client, sweeps)).state in (
            sweep_pb2.SWEEP_STATE_SUCCEEDED, sweep_pb2.SWEEP_STATE_FAILED, sweep_pb2.SWEEP_STATE_CANCELLED) and s)
        assert done.state == sweep_pb2.SWEEP_STATE_SUCCEEDED, f"{done.state_reason}: {done.state_message}"
        assert [t.state for t in done.trials] == [job_pb2.JOB_STATE_SUCCEEDED] * 2
        assert all(t.HasField("objective") and t.objective < 10 for t in done.trials)
        best = min(done.trials, key=lambda t: (t.objective, t.learning_rate))
        assert (done.best_trial, done.best_learning_rate) == (best.job, best.learning_rate)
        assert done.target_job == "jobs/e2e-target" and done.target_state == job_pb2.JOB_STATE_SUCCEEDED
        assert 0 < done.tuning_flops_ratio

        listed = client.jobs.ListJobs(js.ListJobsRequest(labels={"roundhouse.io/sweep": "e2e"},
                                                         view=js.JOB_VIEW_FULL), metadata=client.metadata).jobs
        assert sorted(j.name for j in listed) == ["jobs/e2e-t0", "jobs/e2e-t1", "jobs/e2e-target"]
        assert [len(j.attempts) for j in listed] == [1, 1, 1]  # each launched once: nothing ran twice
        target = next(j for j in listed if j.name == "jobs/e2e-target")
        assert target.spec.training.learning_rate == done.best_learning_rate
        assert target.spec.model.hidden_size == 64
        client.close()
    finally:
        server.kill()
        server.wait()
    for job in ("e2e-t0", "e2e-t1", "e2e-target"):
        assert processes_of(job) == []
