"""The local launcher with a tiny stand-in for the trainer (no torch): how a rank's end is recorded after
SIGTERM to its process group, what each rank is given (layout, checkpoint directory), stop and capacity."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from contract.job_dirs import OutsideJobDir
from contract.rank_env import RankEnv
from orchestrator.launcher import AttemptRef, LaunchRequest, Phase
from orchestrator.launcher.local import LocalLauncher, minimum_environ
from orchestrator.planner import spec_at_layout
from contract.spec import parse_spec
from tests.support.waiting import DEADLINE, wait_until

# Behaves like the trainer where it matters here: SIGTERM -> exit 4 ("preempted"); RH_CHILD_CRASH_RANK exits 17.
RANK_SCRIPT = """\
import json, os, signal, sys, time
from pathlib import Path

run, rank = Path(os.environ["ROUNDHOUSE_RUN_DIR"]), os.environ["RANK"]

def preempted(*_):
    (run / f"term-{rank}").write_text("")
    sys.exit(4)

signal.signal(signal.SIGTERM, preempted)
(run / f"env-{rank}.json").write_text(json.dumps(dict(os.environ)))
if os.environ.get("RH_CHILD_CRASH_RANK") == rank:
    sys.exit(17)
(run / f"ready-{rank}").write_text("")
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def launcher(tmp_path) -> LocalLauncher:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return LocalLauncher(tmp_path / "runs", rank_command=[sys.executable, str(script)])


def request(job: str = "j", tp: int = 1, pp: int = 1, dp: int = 2, **sections) -> LaunchRequest:
    """Attempt 1 of a tp=2 pp=1 dp=2 job (4 ranks, down to 1), at the layout asked for."""
    spec = parse_spec({"name": job, "parallelism": {"tp": 2, "dp": 2}, "resources": {"min_ranks": 1},
                       "training": {"global_batch_size": 8, "micro_batch_size": 2}, **sections})
    return LaunchRequest(job=job, job_uid="uid", attempt=1, spec=spec_at_layout(spec, tp, pp, dp), tp=tp, pp=pp,
                         dp=dp, start_step=7, job_token="token", server_address="127.0.0.1:1")


def stop(launcher: LocalLauncher, ref: AttemptRef, grace_seconds: float) -> None:
    """Stops the gang and waits until it is gone (the launcher's stop only signals)."""
    launcher.stop(ref, grace_seconds)
    wait_until(lambda: launcher.ranks_gone(ref), timeout=grace_seconds + 20)


def launch_and_wait_ready(launcher: LocalLauncher, req: LaunchRequest) -> AttemptRef:
    ref = AttemptRef(req.job, req.attempt, launcher.launch(req))
    run = launcher.attempt_dir(req.job, req.attempt)
    wait_until(lambda: all((run / f"ready-{r}").exists() for r in range(req.world_size)))
    return ref


def test_sigterm_to_the_group_is_recorded_as_preempted(launcher):
    ref = launch_and_wait_ready(launcher, request())
    assert launcher.status(ref).phase is Phase.RUNNING
    for rank in ref.launch_info["ranks"]:
        os.killpg(rank["pid"], signal.SIGTERM)  # what a node's shutdown does: the wrapper gets it too
    run = Path(ref.launch_info["dir"])
    # The first exit file already makes the attempt FAILED; wait for both ranks' (no race on the second).
    wait_until(lambda: all((run / f"rank-{r}.exit").exists() for r in range(2)))
    status = launcher.status(ref)
    assert [(run / f"rank-{r}.exit").read_text().strip() for r in range(2)] == ["4", "4"]
    assert status.phase is Phase.FAILED and status.reason == "Preempted"
    assert "was preempted (exit code 4)" in status.message
    stop(launcher, ref, 1)


def test_a_crash_before_the_others_are_stopped_stays_a_crash(launcher):
    req = request(env={"RH_CHILD_CRASH_RANK": "1"})
    ref = AttemptRef(req.job, req.attempt, launcher.launch(req))
    run = Path(ref.launch_info["dir"])
    wait_until(lambda: (run / "rank-1.exit").exists() and (run / "ready-0").exists())
    time.sleep(0.05)  # the exit files' times order the failures
    stop(launcher, ref, 5)  # rank 0 gets SIGTERM and exits 4, after rank 1 crashed
    assert (run / "rank-0.exit").read_text().strip() == "4"
    status = launcher.status(ref)
    assert status.phase is Phase.FAILED and status.reason == "RankFailed"
    assert status.message.startswith("rank 1 exited with code 17")


def test_a_rank_that_exits_notifies_its_job_at_once(launcher):
    exits = []
    launcher.subscribe(lambda job: exits.append(job))
    req = request(env={"RH_CHILD_CRASH_RANK": "1"})
    ref = AttemptRef(req.job, req.attempt, launcher.launch(req))
    run = Path(ref.launch_info["dir"])
    wait_until(lambda: exits)  # rank 1 crashed: the control plane is told without polling
    assert (run / "rank-1.exit").read_text().strip() == "17"
    assert launcher.status(ref).reason == "RankFailed"
    stop(launcher, ref, 0)
    wait_until(lambda: exits == ["j", "j"])  # and rank 0, killed


def test_ranks_run_the_spec_at_the_attempts_layout_with_the_jobs_checkpoint_dir(launcher, tmp_path):
    req = request(tp=2, dp=1)  # reshaped from the spec's 4 ranks to 2
    ref = launch_and_wait_ready(launcher, req)
    run = Path(ref.launch_info["dir"])
    spec = parse_spec(json.loads((run / "spec.json").read_text()))
    assert (spec.parallelism.tp, spec.parallelism.pp, spec.parallelism.dp) == (2, 1, 1)
    assert spec.resources.ranks == 2 and spec.resources.min_ranks == 1
    env = json.loads((run / "env-1.json").read_text())
    checkpoints = tmp_path / "runs" / "j" / "checkpoints"
    assert env["WORLD_SIZE"] == "2" and env["ROUNDHOUSE_START_STEP"] == "7"
    assert env["ROUNDHOUSE_CHECKPOINT_DIR"] == str(checkpoints) and checkpoints.is_dir()
    stop(launcher, ref, 5)


def test_the_specs_checkpoint_directory_is_under_the_jobs_directory(launcher, tmp_path):
    ref = launch_and_wait_ready(launcher, request(checkpoint={"directory": "shared/ckpt"}))
    env = json.loads((Path(ref.launch_info["dir"]) / "env-0.json").read_text())
    checkpoints = tmp_path / "runs" / "j" / "shared" / "ckpt"
    assert env["ROUNDHOUSE_CHECKPOINT_DIR"] == str(checkpoints) and checkpoints.is_dir()
    assert env["ROUNDHOUSE_JOB_DIR"] == str(tmp_path / "runs" / "j")
    stop(launcher, ref, 5)


def test_a_symlink_in_the_job_directory_leading_out_fails_the_launch_before_any_rank_starts(launcher, tmp_path):
    other = tmp_path / "runs" / "other" / "checkpoints"
    other.mkdir(parents=True)
    (tmp_path / "runs" / "j").mkdir()
    (tmp_path / "runs" / "j" / "checkpoints").symlink_to(other)  # the default checkpoint directory's place
    with pytest.raises(OutsideJobDir, match="outside the job's directory"):
        launcher.launch(request())
    assert not launcher.attempt_dir("j", 1).exists()  # nothing written, no rank started


def test_a_rank_starts_from_a_clean_environment(launcher, tmp_path, monkeypatch):
    # Variables of the control plane's own (a secret, an interpreter setting) must not reach a rank.
    monkeypatch.setenv("RH_SENTINEL_SECRET", "control-plane-only")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("ROUNDHOUSE_TOKEN", "admin-token")
    ref = launch_and_wait_ready(launcher, request(env={"NCCL_DEBUG": "INFO"}))
    env = json.loads((Path(ref.launch_info["dir"]) / "env-0.json").read_text())
    contract = set(RankEnv(spec_file="x", data_roots=(), server="x", run_dir="x", job_dir="x",
                           checkpoint_dir="x").to_environ())
    minimum = set(minimum_environ(sys.executable))
    # What the wrapper's shell (PWD) and the interpreter (LC_CTYPE, on some systems) add at start-up.
    added_at_start = {"PWD", "LC_CTYPE"}
    assert set(env) - contract - minimum - added_at_start == {"NCCL_DEBUG"}
    assert "RH_SENTINEL_SECRET" not in env and "ROUNDHOUSE_TOKEN" not in env
    assert env["PATH"].split(os.pathsep)[-1] == str(Path(sys.executable).parent)
    assert env["ROUNDHOUSE_TEST_HOOKS"] == "0" and env["ROUNDHOUSE_DATA_ROOTS"] == ""
    stop(launcher, ref, 5)


def test_the_launcher_tells_its_ranks_the_data_roots_and_whether_test_hooks_are_on(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launcher = LocalLauncher(tmp_path / "runs", rank_command=[sys.executable, str(script)],
                             data_roots=(tmp_path / "d1", tmp_path / "d2"), allow_test_hooks=True)
    ref = launch_and_wait_ready(launcher, request())
    env = RankEnv.from_environ(json.loads((Path(ref.launch_info["dir"]) / "env-1.json").read_text()))
    assert env.test_hooks and env.data_roots == (str(tmp_path / "d1"), str(tmp_path / "d2"))
    assert (env.rank, env.world_size, env.job, env.attempt, env.token) == (1, 2, "jobs/j", 1, "token")
    stop(launcher, ref, 5)


def test_stop_without_grace_kills_at_once_without_sigterm(launcher):
    ref = launch_and_wait_ready(launcher, request())
    started = time.monotonic()
    stop(launcher, ref, 0)
    assert time.monotonic() - started < 5
    run = Path(ref.launch_info["dir"])
    assert not list(run.glob("term-*")), "a rank got SIGTERM"
    status = launcher.status(ref)
    assert status.phase is Phase.FAILED and "killed" in status.message


def test_capacity_is_max_ranks_and_follows_changes(tmp_path):
    assert LocalLauncher(tmp_path).capacity() is None
    launcher = LocalLauncher(tmp_path, max_ranks=8)
    assert launcher.capacity() == 8
    launcher.max_ranks = 4  # nodes lost
    assert launcher.capacity() == 4


def test_a_request_whose_spec_is_not_at_its_layout_is_refused():
    spec = parse_spec({"name": "j", "parallelism": {"dp": 2}, "training": {"global_batch_size": 8,
                                                                            "micro_batch_size": 2}})
    with pytest.raises(ValueError, match="not the attempt's"):
        LaunchRequest(job="j", job_uid="u", attempt=1, spec=spec, tp=1, pp=1, dp=1, start_step=0, job_token="t",
                      server_address="x")
