"""Faults injected into real jobs run through the control plane (local launcher, real rank processes, gloo,
checkpoints on disk). Each job must end SUCCEEDED with the final loss of an uninterrupted run, resuming from
the newest committed checkpoint that is intact: none is lost.

The faults: kill -9 of a random rank at a random step; a rank dying while it writes a checkpoint; a flipped
byte in the newest checkpoint; kill -9 of the control plane; a rank whose heartbeats stop (a hang); SIGTERM to
every rank (a preemption); and a restart with half the ranks (reshaped by the planner)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import spawn_server
from orchestrator.controller import ReconcilerSettings
from orchestrator.server import ControlPlane, ServerSettings
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import Checkpoint
from roundhouse.v1 import job_pb2, job_service_pb2 as js
from trainers.checkpoint import committed_steps, step_dir

from tests.conftest import TEST_MAX_RANKS, Client, processes_of
from tests.e2e.test_local_jobs import TERMINAL, TINY_MODEL, events, wait_for
from tests.e2e.test_trainer import losses, run_ranks, write_spec
from tests.support.waiting import DEADLINE

pytestmark = pytest.mark.slow

STEPS = 14
TRAINING = {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 0,
            "learning_rate": 3e-3, "seed": 11}
CHECKPOINT = {"interval": 2, "keep_last": 2}


def float32(value: float) -> float:
    """The loss is a float32: the log prints 9 digits, the API carries it as a double; both name one float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def fault_spec(name: str, dp: int = 2, env: dict | None = None, restart_policy: dict | None = None,
               resources: dict | None = None) -> dict:
    return {"name": name, "model": TINY_MODEL, "parallelism": {"dp": dp}, "training": TRAINING,
            "checkpoint": CHECKPOINT, "restart_policy": restart_policy or {"max_restarts": 2},
            "resources": resources or {}, "env": {"RH_TEST_STEP_SLEEP": "0.15", **(env or {})}}


@pytest.fixture(scope="module")
def reference_loss(tmp_path_factory) -> float:
    """The final loss of the same training, uninterrupted (no control plane, no faults)."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = write_spec(tmp, model=TINY_MODEL, parallelism={"dp": 2}, training=TRAINING)
    outcomes = run_ranks(spec, tmp, world_size=2)
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes[0][2][-2000:]
    trained = losses(outcomes[0][1])
    assert len(trained) == STEPS
    return trained[-1]


class Plane:
    """A control plane in this process with a client, and the paths a test pokes at."""

    def __init__(self, home: Path, restart_backoff_seconds: float = 0.2):
        self.home = home
        self.control = ControlPlane(ServerSettings(
            home=home, db_url=None, grpc_port=0, http_port=0, reconcile=True, allow_test_hooks=True,
            max_ranks=TEST_MAX_RANKS,
            reconciler=ReconcilerSettings(interval_seconds=0.2, restart_backoff_seconds=restart_backoff_seconds,
                                          stop_grace_seconds=5)))
        self.control.start()
        self.client = Client(self.control.grpc_address, token_file(home).read_text().strip())

    def submit(self, spec: dict) -> str:
        self.client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(parse_spec(spec))),
                                   metadata=self.client.metadata)
        return f"jobs/{spec['name']}"

    def checkpoints(self, job: str) -> Path:
        return self.home / "runs" / job.removeprefix("jobs/") / "checkpoints"

    def checkpoint_rows(self, job: str) -> list[Checkpoint]:
        with self.control.db.read() as session:
            return list(session.scalars(select(Checkpoint).where(Checkpoint.job_name == job.removeprefix("jobs/"))
                                        .order_by(Checkpoint.step)))

    def close(self) -> None:
        self.client.close()
        self.control.stop()


@pytest.fixture
def plane(tmp_path):
    p = Plane(tmp_path / "home")
    yield p
    p.close()


def rank_processes(job: str) -> dict[int, int]:
    """rank -> pid of the trainer process itself (not its shell wrapper)."""
    out = {}
    for pid in processes_of(job.removeprefix("jobs/")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainers" in cmdline and b"rank-wrapper" not in cmdline:
            rank = next(int(e.split(b"=")[1]) for e in environ if e.startswith(b"RANK="))
            out[rank] = pid
    return out


def finished(plane_client: Client, job: str, timeout: float = DEADLINE) -> job_pb2.Job:
    return wait_for(plane_client, job, lambda j: j.state in TERMINAL, timeout=timeout)


def assert_resumed_from_newest(plane: Plane, job: job_pb2.Job, expected_start: int) -> None:
    """The second attempt started from the newest intact committed checkpoint, and every committed checkpoint
    the control plane knows of is still on disk (nothing committed was lost)."""
    assert len(job.attempts) >= 2, job
    assert job.attempts[1].start_step == expected_start
    on_disk = set(committed_steps(plane.checkpoints(job.name)))
    assert {row.step for row in plane.checkpoint_rows(job.name)} <= on_disk
    assert job.checkpoint_step == max(on_disk) == STEPS


def test_kill_9_of_a_random_rank_at_a_random_step(plane, reference_loss):
    chance = random.Random(os.getpid())
    job = plane.submit(fault_spec("kill-rank"))
    at = chance.randrange(3, 9)
    wait_for(plane.client, job, lambda j: j.current_step >= at and j.checkpoint_step >= 2)
    committed_before = committed_steps(plane.checkpoints(job))[0]
    victim = chance.randrange(2)
    os.kill(rank_processes(job)[victim], signal.SIGKILL)

    done = finished(plane.client, job)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert done.attempts[0].end_reason.startswith(f"rank {victim} ")
    assert done.attempts[1].start_step >= committed_before
    assert_resumed_from_newest(plane, done, done.attempts[1].start_step)
    assert float32(done.last_loss) == float32(reference_loss)


def test_a_rank_killed_while_writing_a_checkpoint(plane, reference_loss):
    job = plane.submit(fault_spec("torn-save", env={"RH_FAULT_EXIT_IN_SAVE_AT_STEP": "6", "RH_FAULT_RANK": "1",
                                                     "RH_FAULT_ATTEMPT": "1"}))
    done = finished(plane.client, job)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert "RH_FAULT_EXIT_IN_SAVE_AT_STEP=6" in done.attempts[0].end_reason
    assert_resumed_from_newest(plane, done, 4)  # step 6 was never committed
    assert float32(done.last_loss) == float32(reference_loss)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_loss):
    plane = Plane(tmp_path / "home", restart_backoff_seconds=3.0)  # time to corrupt it before the restart
    try:
        job = plane.submit(fault_spec("corrupt", env={"RH_FAULT_EXIT_AT_STEP": "9", "RH_FAULT_ATTEMPT": "1"}))
        wait_for(plane.client, job, lambda j: j.state == job_pb2.JOB_STATE_RESTARTING)
        # Step 8's save may still have been in flight at the crash: then 6 is the newest committed.
        newest, previous = committed_steps(plane.checkpoints(job))[:2]
        assert newest in (6, 8)
        shard = sorted(step_dir(plane.checkpoints(job), newest).glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x40
        shard.write_bytes(bytes(data))

        done = finished(plane.client, job)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
        assert done.attempts[1].start_step == previous
        corrupt = [e for e in events(plane.client, job) if e.reason == "CheckpointCorrupt"]
        assert len(corrupt) == 1 and "SHA-256" in corrupt[0].message and corrupt[0].attempt == 2
        assert float32(done.last_loss) == float32(reference_loss)
    finally:
        plane.close()


def test_kill_9_of_the_control_plane_during_a_run(tmp_path, reference_loss):
    home, port = tmp_path / "home", free_port()
    server = spawn_server(home, None, port, log_path=tmp_path / "server.log", allow_test_hooks=True,
                          max_ranks=TEST_MAX_RANKS)
    try:
        client = Client(f"127.0.0.1:{port}", token_file(home).read_text().strip())
        spec = fault_spec("headless")
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(parse_spec(spec))), metadata=client.metadata)
        wait_for(client, "jobs/headless", lambda j: j.checkpoint_step >= 2)
        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(2.0)  # checkpoints commit with nobody listening; their reports wait in the ranks
        server = spawn_server(home, None, port, log_path=tmp_path / "server.log", allow_test_hooks=True,
                          max_ranks=TEST_MAX_RANKS)
        done = finished(client, "jobs/headless")
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
        assert len(done.attempts) == 1
        assert done.checkpoint_step == STEPS  # every commit reached the new control plane
        assert float32(done.last_loss) == float32(reference_loss)
        client.close()
    finally:
        server.kill()
        server.wait()
    assert processes_of("headless") == []


def test_a_hung_rank_is_detected_from_its_heartbeats_and_restarted(plane, reference_loss):
    job = plane.submit(fault_spec(
        "hang", env={"RH_FAULT_HANG_AT_STEP": "5", "RH_FAULT_RANK": "1", "RH_FAULT_ATTEMPT": "1"},
        restart_policy={"max_restarts": 0, "max_hang_restarts": 1, "hang_timeout_seconds": 10}))
    done = finished(plane.client, job)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert (done.restart_count, done.hang_restart_count) == (0, 1)
    hung = [e for e in events(plane.client, job) if e.reason == "Hung"]
    assert hung and "rank 1" in hung[0].message
    assert_resumed_from_newest(plane, done, 4)
    assert float32(done.last_loss) == float32(reference_loss)
    assert processes_of("hang") == []


def test_sigterm_to_every_rank_is_a_preemption_that_resumes_from_its_checkpoint(plane, reference_loss):
    job = plane.submit(fault_spec("preempted", restart_policy={"max_restarts": 0, "max_preemptions": 1}))
    wait_for(plane.client, job, lambda j: j.current_step >= 5)
    launch = json.loads((plane.home / "runs/preempted/attempt-1/launch.json").read_text())
    for rank in launch["ranks"]:
        os.killpg(rank["pid"], signal.SIGTERM)

    done = finished(plane.client, job)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert (done.restart_count, done.preemption_count) == (0, 1)
    assert done.attempts[0].end_reason.endswith("exited with code 4") or "code 4" in done.attempts[0].end_reason
    log = (plane.home / "runs/preempted/attempt-1/rank-0.log").read_text()
    stopped_after = int(log.split("SIGTERM: stopped after step ")[1].split(",")[0])
    assert_resumed_from_newest(plane, done, stopped_after)  # the preemption's own checkpoint
    assert float32(done.last_loss) == float32(reference_loss)


def test_a_restart_with_half_the_ranks_resumes_reshaped(plane, reference_loss):
    spec = fault_spec("shrink", dp=4, resources={"ranks": 4, "min_ranks": 2})
    job = plane.submit(spec)
    wait_for(plane.client, job, lambda j: j.checkpoint_step >= 4)
    plane.control.launcher.max_ranks = 2  # two of the four "nodes" are gone
    os.kill(rank_processes(job)[3], signal.SIGKILL)

    done = finished(plane.client, job)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert len(done.attempts) == 2, [(e.reason, e.message) for e in events(plane.client, job)]
    assert done.attempts[0].world_size == 4 and done.attempts[1].world_size == 2
    assert done.attempts[1].layout == job_pb2.Layout(tp=1, pp=1, dp=2)
    reshaped = [e for e in events(plane.client, job) if e.reason in ("Reshaped", "CheckpointRestored")]
    assert any("2 of 4" in e.message or "2 ranks" in e.message for e in reshaped), reshaped
    # The uninterrupted run (at dp=2, the module's reference): every layout trains the same losses to 1e-5
    # (tests/e2e/test_parallel.py), and this run changed layout half-way.
    assert done.last_loss == pytest.approx(reference_loss, rel=1e-5)
