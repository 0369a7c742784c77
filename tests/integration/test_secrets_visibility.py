"""Secrets on a shared control plane, on both databases: a spec's env values are shown to the job's (or sweep's)
owner and admins only, every other caller sees "<redacted>" in every view of the spec (GetJob, ListJobs in its
full view, WatchJob, the sweep calls, `roundhouse get`); the placeholder itself is refused as a value, naming the
field, with nothing written; and the control plane's files (home, database, admin token, run files) are readable
by its own user alone."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from contract.spec import REDACTED_ENV_VALUE, parse_spec, spec_to_proto
from contract.sweep import parse_sweep, sweep_to_proto
from orchestrator.auth import create_token
from orchestrator.cli import app
from orchestrator.config import token_file
from orchestrator.launcher import LaunchRequest
from orchestrator.launcher.local import LocalLauncher
from orchestrator.store import Event, Job, Sweep
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc, sweep_service_pb2 as ss, sweep_service_pb2_grpc

from tests.conftest import start_plane
from tests.integration.test_api import field_violations
from tests.integration.test_sweeps import sweep_data
from tests.support.waiting import DEADLINE

SECRETS = {"WANDB_API_KEY": "s3cret-value", "MODE": "fast"}
REDACTED = {name: REDACTED_ENV_VALUE for name in SECRETS}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def callers(client, api_plane) -> dict[str, str]:
    """Tokens by who holds them: the admin the plane wrote at first start, alice (the owner) and bob."""
    return {"admin": client.token, "alice": create_token(api_plane.db, "alice", "user"),
            "bob": create_token(api_plane.db, "bob", "user")}


def job_spec(name: str = "secret"):
    return spec_to_proto(parse_spec({"name": name, "env": dict(SECRETS)}))


def sweep_spec(name: str = "lr"):
    data = sweep_data(name=name)
    data["proxy"]["env"] = dict(SECRETS)
    data["target"]["env"] = dict(SECRETS)
    return sweep_to_proto(parse_sweep(data)[0])


def rows(plane, model) -> int:
    with plane.db.read() as session:
        return session.scalar(select(func.count()).select_from(model))


def first_update(call: Iterator):
    """The first message of a stream, then the stream cancelled (a watched job that never ends)."""
    try:
        return next(call)
    finally:
        call.cancel()


# -- who sees env values -----------------------------------------------------------------------------------


def test_a_jobs_env_values_are_shown_to_its_owner_and_admins_and_redacted_for_everyone_else(client, callers):
    created = client.jobs.CreateJob(js.CreateJobRequest(spec=job_spec()), metadata=bearer(callers["alice"]))
    assert dict(created.spec.env) == SECRETS  # the owner's own answer

    for who, expected in (("alice", SECRETS), ("admin", SECRETS), ("bob", REDACTED)):
        metadata = bearer(callers[who])
        got = client.jobs.GetJob(js.GetJobRequest(name="jobs/secret"), metadata=metadata)
        assert dict(got.spec.env) == expected, who
        listed = client.jobs.ListJobs(js.ListJobsRequest(view=js.JOB_VIEW_FULL), metadata=metadata).jobs
        assert [dict(j.spec.env) for j in listed] == [expected], who
        basic = client.jobs.ListJobs(js.ListJobsRequest(), metadata=metadata).jobs
        assert [dict(j.spec.env) for j in basic] == [{}], who  # the basic view carries no env at all
        watched = first_update(client.jobs.WatchJob(js.WatchJobRequest(name="jobs/secret"), metadata=metadata,
                                                    timeout=DEADLINE))
        assert dict(watched.job.spec.env) == expected, who
        if who == "bob":
            assert "s3cret-value" not in f"{got}{listed}{watched}"

    cancelled = client.jobs.CancelJob(js.CancelJobRequest(name="jobs/secret"), metadata=bearer(callers["alice"]))
    assert dict(cancelled.spec.env) == SECRETS


def test_a_sweeps_env_values_are_shown_to_its_owner_and_admins_and_redacted_for_everyone_else(client, callers):
    stub = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
    created = stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_spec()), metadata=bearer(callers["alice"]))
    assert dict(created.spec.proxy.env) == SECRETS and dict(created.spec.target.env) == SECRETS

    for who, expected in (("alice", SECRETS), ("admin", SECRETS), ("bob", REDACTED)):
        metadata = bearer(callers[who])
        views = [stub.GetSweep(ss.GetSweepRequest(name="sweeps/lr"), metadata=metadata),
                 *stub.ListSweeps(ss.ListSweepsRequest(view=ss.SWEEP_VIEW_FULL), metadata=metadata).sweeps,
                 first_update(stub.WatchSweep(ss.WatchSweepRequest(name="sweeps/lr"), metadata=metadata,
                                              timeout=DEADLINE))]
        for view in views:
            assert dict(view.spec.proxy.env) == expected, who
            assert dict(view.spec.target.env) == expected, who


def test_roundhouse_get_shows_env_names_with_values_or_redacted(client, callers, api_plane):
    client.jobs.CreateJob(js.CreateJobRequest(spec=job_spec()), metadata=bearer(callers["alice"]))
    runner = CliRunner()

    def get(who: str, *extra: str) -> str:
        result = runner.invoke(app, ["get", "secret", "--server", api_plane.grpc_address, "--token", callers[who],
                                     *extra], env={"ROUNDHOUSE_SERVER": None, "ROUNDHOUSE_TOKEN": None},
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    assert "MODE=fast, WANDB_API_KEY=s3cret-value" in get("alice")
    assert "MODE=fast, WANDB_API_KEY=s3cret-value" in get("admin")
    shown = get("bob")
    assert f"MODE={REDACTED_ENV_VALUE}, WANDB_API_KEY={REDACTED_ENV_VALUE}" in shown
    assert "s3cret-value" not in shown
    assert json.loads(get("bob", "--output", "json"))["spec"]["env"] == REDACTED
    assert json.loads(get("alice", "--output", "json"))["spec"]["env"] == SECRETS


# -- the placeholder is not a value ------------------------------------------------------------------------


def test_a_redacted_value_copied_back_is_refused_naming_the_field_and_nothing_is_written(client, callers, api_plane):
    spec = job_spec()
    spec.env["WANDB_API_KEY"] = REDACTED_ENV_VALUE  # as copied from a view of someone else's job
    with pytest.raises(grpc.RpcError) as refused:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=bearer(callers["bob"]))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value) == ["spec.env.WANDB_API_KEY"]
    assert rows(api_plane, Job) == 0 and rows(api_plane, Event) == 0

    stub = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
    copied = sweep_spec()
    copied.proxy.env["MODE"] = REDACTED_ENV_VALUE
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateSweep(ss.CreateSweepRequest(spec=copied), metadata=bearer(callers["bob"]))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.proxy.env.MODE" in refused.value.details()
    assert rows(api_plane, Sweep) == 0 and rows(api_plane, Job) == 0


# -- file modes --------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The usual umask (022), under which files and directories are created readable by everyone by default."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_home_database_and_admin_token_are_the_control_planes_alone(tmp_path, permissive_umask):
    home = tmp_path / "home"
    plane = start_plane(home, None, reconcile=False)  # the default SQLite database in the home directory
    try:
        client_token = token_file(home).read_text().strip()
        with grpc.insecure_channel(plane.grpc_address) as channel:  # a write, so the WAL and its index exist
            job_service_pb2_grpc.JobServiceStub(channel).CreateJob(js.CreateJobRequest(spec=job_spec()),
                                                                   metadata=bearer(client_token))
        database = home / "roundhouse.db"
        assert mode(home) == 0o700
        assert mode(token_file(home)) == 0o600
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            assert path.exists() and mode(path) == 0o600, path
    finally:
        plane.stop()


def test_a_looser_home_database_and_token_left_by_an_older_version_are_tightened_with_a_warning(
        tmp_path, permissive_umask, caplog):
    home = tmp_path / "home"
    start_plane(home, None, reconcile=False).stop()
    database = home / "roundhouse.db"
    os.chmod(home, 0o755)
    os.chmod(database, 0o644)
    os.chmod(token_file(home), 0o644)
    with caplog.at_level(logging.WARNING, logger="orchestrator.config"):
        plane = start_plane(home, None, reconcile=False)
    try:
        assert (mode(home), mode(database), mode(token_file(home))) == (0o700, 0o600, 0o600)
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert str(home) in warned and str(database) in warned and str(token_file(home)) in warned
    finally:
        plane.stop()


def test_run_directories_and_the_files_the_local_launcher_writes_are_its_users_alone(tmp_path, permissive_umask):
    runs = tmp_path / "runs"
    launcher = LocalLauncher(runs, rank_command=[sys.executable, "-c", "print('rank says hello')"])
    spec = parse_spec({"name": "files", "env": dict(SECRETS)})
    info = launcher.launch(LaunchRequest(job="files", job_uid="uid", attempt=1, spec=spec, tp=1, pp=1, dp=1,
                                         start_step=0, job_token="token", server_address="127.0.0.1:1"))
    attempt = launcher.attempt_dir("files", 1)
    assert info["dir"] == str(attempt)
    for directory in (runs, launcher.job_dir("files"), attempt):
        assert mode(directory) == 0o700, directory
    for path in (attempt / "spec.json", attempt / "launch.json", launcher.log_path("files", 1, 0)):
        assert mode(path) == 0o600, path
    _wait_for(lambda: (attempt / "rank-0.exit").exists())
    # A job directory left looser (by an older version) is tightened at its next launch.
    os.chmod(launcher.job_dir("files"), 0o755)
    launcher.launch(LaunchRequest(job="files", job_uid="uid", attempt=2, spec=spec, tp=1, pp=1, dp=1,
                                  start_step=0, job_token="token", server_address="127.0.0.1:1"))
    assert mode(launcher.job_dir("files")) == 0o700 and mode(launcher.attempt_dir("files", 2)) == 0o700
    _wait_for(lambda: (launcher.attempt_dir("files", 2) / "rank-0.exit").exists())


def _wait_for(predicate) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
