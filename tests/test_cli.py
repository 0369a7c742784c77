"""The `roundhouse` CLI against a real control plane in this process."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import token_file

from .conftest import start_plane

runner = CliRunner()

TINY = """\
name: {name}
labels: {{team: cli}}
model: {{layers: 2, hidden_size: 32, heads: 2, seq_length: 32}}
parallelism: {{dp: 2}}
training: {{steps: 5, global_batch_size: 4, micro_batch_size: 2}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli-home")
    plane = start_plane(home, None, reconcile=True)
    yield {"ROUNDHOUSE_SERVER": plane.grpc_address, "ROUNDHOUSE_TOKEN": token_file(home).read_text().strip()}
    plane.stop()


def run(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env or {}, catch_exceptions=False)


def test_invalid_spec_is_refused_locally_with_each_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: Bad_Name\nmodel: {layers: 0}\noptimizer: sgd\n")
    result = run("submit", str(path), env={"ROUNDHOUSE_SERVER": "127.0.0.1:1", "ROUNDHOUSE_TOKEN": "x"})
    assert result.exit_code == 2
    for field in ("name:", "model.layers:", "optimizer: unknown field"):
        assert field in result.output


def test_missing_token_says_where_to_find_one(tmp_path):
    result = run("list", env={"ROUNDHOUSE_HOME": str(tmp_path), "ROUNDHOUSE_TOKEN": ""})
    assert result.exit_code == 1
    assert "no API token" in result.output


def test_submit_wait_list_get_logs_and_cancel(server, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(name="cli-tiny"))

    submitted = run("submit", str(path), "--wait", env=server)
    assert submitted.exit_code == 0, submitted.output
    assert "jobs/cli-tiny: SUCCEEDED" in submitted.output
    assert "RUNNING → SUCCEEDED" in submitted.output

    listed = run("list", "--label", "team=cli", "--output", "json", env=server)
    jobs = json.loads(listed.output)["jobs"]
    assert [(j["name"], j["state"]) for j in jobs] == [("jobs/cli-tiny", "JOB_STATE_SUCCEEDED")]
    assert "cli-tiny" in run("list", "--state", "succeeded", env=server).output
    assert "cli-tiny" not in run("list", "--state", "running", env=server).output

    got = run("get", "cli-tiny", env=server)
    assert got.exit_code == 0 and "SUCCEEDED" in got.output and "1×1×2" in got.output
    assert json.loads(run("get", "jobs/cli-tiny", "-o", "json", env=server).output)["current_step"] == "5"

    log = run("logs", "cli-tiny", "--rank", "0", env=server)
    assert "step 5/5" in log.output

    again = run("submit", str(path), env=server)
    assert again.exit_code == 1 and "ALREADY_EXISTS" in again.output

    renamed = run("submit", str(path), "--name", "cli-tiny-2", env=server)
    assert renamed.exit_code == 0 and "jobs/cli-tiny-2" in renamed.output
    cancelled = run("cancel", "cli-tiny-2", env=server)
    assert cancelled.exit_code == 0 and "CANCELLED" in cancelled.output

    finished = run("cancel", "cli-tiny", env=server)
    assert finished.exit_code == 1 and "FAILED_PRECONDITION" in finished.output


def test_unknown_job_is_not_found(server):
    result = run("get", "nope", env=server)
    assert result.exit_code == 1 and "NOT_FOUND" in result.output


def test_bad_state_filter_is_a_usage_error(server):
    result = run("list", "--state", "bogus", env=server)
    assert result.exit_code == 2
