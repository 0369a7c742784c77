"""Jobs run for real through the control plane and the local launcher: real rank processes, gloo, real files.

Covers the lifecycle end to end: a job trains to SUCCEEDED; cancel stops every process; a rank's failure
restarts the gang and fails the job once the restart budget is spent; a control plane killed with -9 and
started again adopts the running ranks and the job finishes, launched once."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from contract.spec import parse_spec, spec_to_proto
from roundhouse.v1 import job_pb2, job_service_pb2 as js

from tests.conftest import TEST_MAX_RANKS, Client, processes_of, start_plane
from tests.support.waiting import DEADLINE

pytestmark = pytest.mark.slow

TINY_MODEL = {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32}
TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}


def tiny_spec(name: str, steps: int = 6, dp: int = 2, env: dict | None = None, max_restarts: int = 0):
    return spec_to_proto(parse_spec({
        "name": name, "model": TINY_MODEL, "parallelism": {"dp": dp},
        "training": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0},
        "restart_policy": {"max_restarts": max_restarts}, "env": env or {}}))


def wait_for(client: Client, name: str, predicate, timeout: float = DEADLINE) -> job_pb2.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.jobs.GetJob(js.GetJobRequest(name=name), metadata=client.metadata)
        if predicate(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{name} never got there; last: {job_pb2.JobState.Name(job.state)} {job.state_message}")


def events(client: Client, name: str) -> list[job_pb2.Event]:
    updates = client.jobs.WatchJob(js.WatchJobRequest(name=name, after_step=-1), metadata=client.metadata,
                                   timeout=DEADLINE)
    return [e for u in updates for e in u.events]


@pytest.fixture
def plane(db_url, tmp_path):
    plane = start_plane(tmp_path / "home", db_url, reconcile=True, data_roots=(tmp_path,))
    yield plane
    plane.stop()


@pytest.fixture
def client(plane):
    c = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    yield c
    c.close()


@pytest.fixture
def sqlite_client(tmp_path):
    """As `client`, on the embedded SQLite alone: for what the database does not change here (the processes'
    side of a cancel, a crash or a bad corpus). The controller's side of each runs on both databases in
    tests/integration/test_reconciler.py, against a stand-in launcher."""
    plane = start_plane(tmp_path / "home", None, reconcile=True, data_roots=(tmp_path,))
    c = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    yield c
    c.close()
    plane.stop()


def test_job_trains_to_succeeded_with_metrics_events_and_logs(client):
    client.jobs.CreateJob(js.CreateJobRequest(spec=tiny_spec("ok", steps=6)), metadata=client.metadata)
    job = wait_for(client, "jobs/ok", lambda j: j.state in TERMINAL)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.state_message
    assert job.current_step == 6 and job.last_loss > 0
    assert [a.state for a in job.attempts] == [job_pb2.ATTEMPT_STATE_SUCCEEDED]
    assert job.attempts[0].layout == job_pb2.Layout(tp=1, pp=1, dp=2)

    transitions = [(e.from_state, e.to_state) for e in events(client, "jobs/ok") if e.type == "StateChanged"]
    assert [t for _, t in transitions] == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_LAUNCHING,
                                           job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED]

    updates = client.jobs.WatchJob(js.WatchJobRequest(name="jobs/ok"), metadata=client.metadata, timeout=DEADLINE)
    steps = sorted({m.step for u in updates for m in u.metrics if m.HasField("loss")})
    assert steps == list(range(1, 7))

    log = "".join(c.text for c in client.jobs.StreamLogs(js.StreamLogsRequest(name="jobs/ok", rank=0),
                                                         metadata=client.metadata, timeout=DEADLINE))
    assert "step 6/6" in log
    assert processes_of("ok") == []


def test_cancel_of_a_running_job_leaves_no_process(sqlite_client):
    spec = tiny_spec("long", steps=1000, env={"RH_TEST_STEP_SLEEP": "0.05"})
    sqlite_client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=sqlite_client.metadata)
    wait_for(sqlite_client, "jobs/long", lambda j: j.state == job_pb2.JOB_STATE_RUNNING and j.current_step >= 2)
    assert len(processes_of("long")) >= 2
    sqlite_client.jobs.CancelJob(js.CancelJobRequest(name="jobs/long"), metadata=sqlite_client.metadata)
    job = wait_for(sqlite_client, "jobs/long", lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert job.state == job_pb2.JOB_STATE_CANCELLED
    assert job.attempts[-1].state == job_pb2.ATTEMPT_STATE_CANCELLED
    assert processes_of("long") == []


def test_rank_failure_restarts_then_fails_when_the_budget_is_spent(sqlite_client):
    spec = tiny_spec("crashy", steps=20, max_restarts=1, env={"RH_FAULT_EXIT_AT_STEP": "2", "RH_FAULT_RANK": "1"})
    sqlite_client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=sqlite_client.metadata)
    job = wait_for(sqlite_client, "jobs/crashy", lambda j: j.state in TERMINAL)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert job.restart_count == 1
    assert [a.state for a in job.attempts] == [job_pb2.ATTEMPT_STATE_FAILED] * 2
    assert all("rank 1 exited with code 17: rank 1: RH_FAULT_EXIT_AT_STEP=2" in a.end_reason for a in job.attempts)
    states = [e.to_state for e in events(sqlite_client, "jobs/crashy") if e.type == "StateChanged"]
    assert states == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_LAUNCHING, job_pb2.JOB_STATE_RUNNING,
                      job_pb2.JOB_STATE_RESTARTING, job_pb2.JOB_STATE_LAUNCHING, job_pb2.JOB_STATE_RUNNING,
                      job_pb2.JOB_STATE_FAILED]
    assert "restart budget of 1 spent" in job.state_message
    assert processes_of("crashy") == []


def test_a_failure_only_the_trainer_sees_fails_the_job_with_its_reason(sqlite_client, tmp_path):
    missing = tmp_path / "no-such-corpus"
    spec = tiny_spec("no-data", steps=3, dp=1)
    spec.data.path = str(missing)
    sqlite_client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=sqlite_client.metadata)
    job = wait_for(sqlite_client, "jobs/no-data", lambda j: j.state in TERMINAL)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert "rank 0 exited with code 1" in job.state_message and str(missing) in job.state_message


def test_the_3d_example_trains_through_the_control_plane(tmp_path):
    """8 ranks (tp=2 pp=2 dp=2): once, on the embedded default; the database does not matter here."""
    plane = start_plane(tmp_path / "home", None, reconcile=True)
    client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    try:
        _train_the_3d_example(client)
    finally:
        client.close()
        plane.stop()


def _train_the_3d_example(client):
    from contract.spec import load_spec_file

    example = load_spec_file(str(Path(__file__).parents[2] / "examples" / "gpt-3d.yaml"))
    example.training.steps, example.training.warmup_steps, example.training.eval_interval = 3, 0, 0
    client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(example)), metadata=client.metadata)
    job = wait_for(client, "jobs/gpt-3d", lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.state_message
    assert job.attempts[0].layout == job_pb2.Layout(tp=2, pp=2, dp=2) and job.attempts[0].world_size == 8
    log = "".join(c.text for c in client.jobs.StreamLogs(js.StreamLogsRequest(name="jobs/gpt-3d", rank=0),
                                                         metadata=client.metadata, timeout=DEADLINE))
    assert "layout tp=2 pp=2 dp=2" in log and "step 3/3" in log
    assert processes_of("gpt-3d") == []


# -- the control plane itself crashes ---------------------------------------------------------------------

def _serve(home: Path, db_url: str, grpc_port: int) -> subprocess.Popen:
    return spawn_server(home, db_url, grpc_port, log_path=home.parent / "server.log", allow_test_hooks=True,
                        max_ranks=TEST_MAX_RANKS)


def test_control_plane_killed_mid_run_adopts_its_ranks_and_the_job_finishes_once(db_url, tmp_path):
    home, port = tmp_path / "home", free_port()
    server = _serve(home, db_url, port)
    try:
        client = Client(f"127.0.0.1:{port}", token_file(home).read_text().strip())
        spec = tiny_spec("survivor", steps=60, env={"RH_TEST_STEP_SLEEP": "0.1"})
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=client.metadata)
        wait_for(client, "jobs/survivor", lambda j: j.state == job_pb2.JOB_STATE_RUNNING and j.current_step >= 3)
        launch = json.loads((home / "runs/survivor/attempt-1/launch.json").read_text())

        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(1.0)  # the ranks train on with nobody listening
        server = _serve(home, db_url, port)

        job = wait_for(client, "jobs/survivor", lambda j: j.state in TERMINAL)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.state_message
        assert len(job.attempts) == 1, "launched twice"
        assert json.loads((home / "runs/survivor/attempt-1/launch.json").read_text()) == launch
        log = (home / "runs/survivor/attempt-1/rank-0.log").read_text()
        assert log.count("step 1/60 ") == 1 and log.count("step 60/60 ") == 1  # one run, not two
        # The ranks outlived the old server and reported to the new one: no step's metrics were lost.
        updates = client.jobs.WatchJob(js.WatchJobRequest(name="jobs/survivor"), metadata=client.metadata,
                                       timeout=DEADLINE)
        assert sorted({m.step for u in updates for m in u.metrics}) == list(range(1, 61))
        client.close()
    finally:
        server.kill()
        server.wait()
    assert processes_of("survivor") == []
