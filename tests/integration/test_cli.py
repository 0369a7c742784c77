"""The `roundhouse` CLI.

Unit tests run the commands against a fake client (no server, no network); the end-to-end tests start
`roundhouse serve` as a separate process on free ports and drive it through the CLI, including a control
plane restart in the middle of `submit --wait`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import typer
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from typer.testing import CliRunner

from orchestrator import config
from orchestrator.cli import app
from orchestrator.cli import jobs as cli
from orchestrator.cli.jobs import parse_labels, parse_state
from orchestrator.client import ClientError, JobClient, connect, describe, job_name, short_name
from orchestrator.process import wait_healthy
from roundhouse.v1 import job_pb2, job_service_pb2 as js, job_service_pb2_grpc

from tests.conftest import processes_of
from tests.support.waiting import DEADLINE

runner = CliRunner()
# Whatever the developer's shell exports must not leak into a test.
CLEAN_ENV = {"ROUNDHOUSE_SERVER": None, "ROUNDHOUSE_TOKEN": None}
UNUSED_SERVER = "127.0.0.1:1"  # nothing listens on port 1

TINY = """\
name: {name}
labels: {{team: cli}}
model: {{layers: 2, hidden_size: 32, heads: 2, seq_length: 32}}
training: {{steps: {steps}, global_batch_size: 4, micro_batch_size: 4}}
env: {env}
"""


def run(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env={**CLEAN_ENV, **(env or {})}, catch_exceptions=False)


# -- fakes -------------------------------------------------------------------------------------------------

def ts(seconds: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=seconds)


def make_job(name: str = "tiny", state: int = job_pb2.JOB_STATE_SUCCEEDED, step: int = 5, **extra) -> job_pb2.Job:
    now = int(time.time())
    fields = {"state_reason": "Completed", "state_message": "all ranks finished", **extra}
    job = job_pb2.Job(
        name=f"jobs/{name}", uid="0b7c7c1e-uid", state=state, owner="admin", current_step=step, total_steps=5, last_loss=4.25,
        tokens_per_second=12345.6, restart_count=1, create_time=ts(now - 125), start_time=ts(now - 120),
        attempts=[job_pb2.Attempt(number=1, state=job_pb2.ATTEMPT_STATE_FAILED, layout=job_pb2.Layout(tp=1, pp=1, dp=2),
                                  world_size=2, start_step=0, end_reason="rank 1: exit 17",
                                  create_time=ts(now - 120), end_time=ts(now - 60)),
                  job_pb2.Attempt(number=2, state=job_pb2.ATTEMPT_STATE_SUCCEEDED,
                                  layout=job_pb2.Layout(tp=1, pp=1, dp=2), world_size=2, start_step=3,
                                  create_time=ts(now - 50), end_time=ts(now - 1))],
        **fields)
    job.spec.name = name
    job.spec.labels["team"] = "cli"
    job.spec.parallelism.dp = 2
    job.spec.resources.ranks = 2
    return job


def event(id_: int, to: int, frm: int = 0, type_: str = "StateChanged", reason: str = "", message: str = ""):
    return job_pb2.Event(id=id_, type=type_, from_state=frm, to_state=to, reason=reason, message=message,
                         create_time=ts(int(time.time())))


class FakeClient:
    """Stands in for JobClient: canned answers, and a record of every call."""

    def __init__(self, jobs=(), pages=None, watches=None, cancel=None, gets=None, create_error=None, checkpoints=(),
                 events=()):
        self.jobs = list(jobs)
        self.events = list(events)
        self.checkpoints = list(checkpoints)
        self.pages = pages or [js.ListJobsResponse(jobs=self.jobs)]
        self.watches = list(watches or [])
        self.cancel_answer = cancel
        self.gets = list(gets or [])
        self.create_error = create_error
        self.calls: list[tuple] = []
        self.views: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def create_job(self, spec):
        self.calls.append(("create_job", spec.name))
        if self.create_error:
            raise self.create_error
        return job_pb2.Job(name=f"jobs/{spec.name}", state=job_pb2.JOB_STATE_QUEUED, total_steps=spec.training.steps,
                           spec=spec)

    def get_job(self, name):
        self.calls.append(("get_job", job_name(name)))
        if self.gets:
            return self.gets.pop(0)
        return next(j for j in self.jobs if j.name == job_name(name))

    def job_events(self, name):
        self.calls.append(("job_events", job_name(name)))
        return list(self.events)

    def list_checkpoints(self, name, page_size=0, page_token=""):
        self.calls.append(("list_checkpoints", job_name(name), page_size))
        return js.ListCheckpointsResponse(checkpoints=self.checkpoints)

    def list_jobs(self, states=(), labels=None, page_size=0, page_token="", view=js.JOB_VIEW_BASIC):
        self.calls.append(("list_jobs", list(states), dict(labels or {}), page_size, page_token))
        self.views.append(view)
        index = int(page_token or 0)
        return self.pages[index]

    def cancel_job(self, name):
        self.calls.append(("cancel_job", job_name(name)))
        if isinstance(self.cancel_answer, Exception):
            raise self.cancel_answer
        return self.cancel_answer

    def watch_job(self, name, after_event_id=0, after_step=-1):
        self.calls.append(("watch_job", job_name(name), after_event_id))
        yield from self.watches.pop(0)()

    def stream_logs(self, name, rank=0, attempt=0, follow=False, offset=0, tail_bytes=0, tail_lines=0):
        self.calls.append(("stream_logs", job_name(name), rank, attempt, follow) + ((tail_lines,) if tail_lines else ()))
        yield js.LogChunk(text="step 1/5 loss 5.5\n")
        yield js.LogChunk(text="step 2/5 loss 5.1\n")


@pytest.fixture
def fake(monkeypatch):
    """Installs a FakeClient as what `connect` returns; configure it through the returned holder."""
    holder = {"client": FakeClient()}
    monkeypatch.setattr(cli, "connect", lambda server, token, tls_ca=None: holder["client"])
    return holder


@pytest.fixture
def no_server(monkeypatch):
    """Fails the test if a command tries to reach a server."""
    def refuse(server, token, tls_ca=None):
        raise AssertionError("the command contacted the server")
    monkeypatch.setattr(cli, "connect", refuse)


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: code, details and the trailing metadata grpcio-status reads."""

    def __init__(self, code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None):
        self._code, self._details = code, details
        self._trailing = (("grpc-status-details-bin", status.SerializeToString()),) if status else ()

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def bad_request_error() -> FakeRpcError:
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="spec.model.heads", description="6 heads are not "
                                                    "divisible by parallelism.tp=4"),
        error_details_pb2.BadRequest.FieldViolation(field="spec.name", description="required")])
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="spec.model.heads: ...; spec.name: required",
                               details=[detail])
    return FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, status.message, status)


# -- input handling, no server -----------------------------------------------------------------------------

def test_invalid_spec_is_refused_locally_with_each_field(tmp_path, no_server):
    path = tmp_path / "bad.yaml"
    path.write_text("name: Bad_Name\nmodel: {layers: 0, hidden_size: 30, heads: 4}\noptimizer: sgd\n")
    result = run("submit", str(path), "--server", UNUSED_SERVER, "--token", "x")
    assert result.exit_code == 2
    for line in ("name: must be an RFC 1123 label", "model.layers: Input should be greater than or equal to 1",
                 "optimizer: unknown field"):
        assert line in result.output


def test_cross_field_violations_are_reported_too(tmp_path, no_server):
    path = tmp_path / "bad.yaml"
    path.write_text("name: ok\nmodel: {hidden_size: 30, heads: 4}\n")
    result = run("submit", str(path), "--server", UNUSED_SERVER, "--token", "x")
    assert result.exit_code == 2
    assert "model.hidden_size: 30 is not divisible by model.heads=4" in result.output


def test_invalid_spec_is_refused_before_any_connection_attempt(tmp_path):
    """The real client against a port nobody listens on: still exit 2 and only the spec's errors."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntraining: {steps: -1}\n")
    result = run("submit", str(path), "--server", UNUSED_SERVER, "--token", "x")
    assert result.exit_code == 2
    assert "training.steps:" in result.output and "UNAVAILABLE" not in result.output


def test_unreadable_or_malformed_spec_files_are_bad_input(tmp_path, no_server):
    missing = run("submit", str(tmp_path / "nope.yaml"), "--token", "x")
    assert missing.exit_code == 2 and "cannot read" in missing.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    result = run("submit", str(broken), "--token", "x")
    assert result.exit_code == 2 and "not valid YAML" in result.output


@pytest.mark.parametrize(("content", "message"), [
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at offset 9"),
    (b"name: a\ntraining: {steps: 5}\ntraining: {steps: 6}\n", "found the key 'training' twice"),
    (b"name: a\ntraining: {steps: true}\n", "training.steps: Input should be a valid integer"),
    (b"name: a\nenv: {DEBUG: yes}\n", "env.DEBUG: Input should be a valid string"),
])
def test_a_file_that_is_not_strict_utf8_yaml_is_bad_input_without_a_traceback(tmp_path, no_server, content,
                                                                                message):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    for command in (["submit"], ["sweep", "submit"]):
        result = run(*command, str(path), "--token", "x")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
    assert message in run("submit", str(path), "--token", "x").output


def test_renaming_on_submit_is_validated_too(tmp_path, no_server):
    path = tmp_path / "ok.yaml"
    path.write_text("name: fine\n")
    result = run("submit", str(path), "--name", "Not_OK", "--token", "x")
    assert result.exit_code == 2 and "name: must be an RFC 1123 label" in result.output


def test_missing_token_says_how_to_get_one(tmp_path):
    result = run("list", "--server", UNUSED_SERVER, env={"ROUNDHOUSE_HOME": str(tmp_path)})
    assert result.exit_code == 1
    assert "no API token" in result.output and str(tmp_path / "admin-token") in result.output
    assert "roundhouse serve" in result.output and "ROUNDHOUSE_TOKEN" in result.output
    # A server started with --home DIR keeps its token there: the message says how to point the CLI at it.
    assert "--home DIR" in result.output and "ROUNDHOUSE_HOME=DIR" in result.output
    assert "Traceback" not in result.output


def test_token_comes_from_the_option_the_environment_or_the_admin_token_file(tmp_path, monkeypatch):
    monkeypatch.delenv("ROUNDHOUSE_TOKEN", raising=False)
    monkeypatch.setenv("ROUNDHOUSE_HOME", str(tmp_path))
    (tmp_path / "admin-token").write_text("from-file\n")
    assert connect(UNUSED_SERVER).metadata == (("authorization", "Bearer from-file"),)
    monkeypatch.setenv("ROUNDHOUSE_TOKEN", "from-env")
    assert connect(UNUSED_SERVER).metadata == (("authorization", "Bearer from-env"),)
    client = connect(UNUSED_SERVER, "explicit")
    assert client.metadata == (("authorization", "Bearer explicit"),) and client.address == UNUSED_SERVER
    client.close()


def test_unreachable_server_is_a_readable_error(tmp_path):
    result = run("get", "x", "--server", UNUSED_SERVER, "--token", "t")
    assert result.exit_code == 1
    assert "UNAVAILABLE: no control plane answers at 127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("given", "expected"), [("tiny", "jobs/tiny"), ("jobs/tiny", "jobs/tiny"),
                                                 (" tiny ", "jobs/tiny")])
def test_job_names_may_be_given_with_or_without_the_collection(given, expected):
    assert job_name(given) == expected
    assert short_name(expected) == "tiny"


def test_commands_send_normalised_job_names(fake):
    fake["client"] = client = FakeClient(jobs=[make_job("tiny")], cancel=make_job("tiny", job_pb2.JOB_STATE_CANCELLED))
    assert run("get", "tiny").exit_code == 0
    assert run("get", "jobs/tiny").exit_code == 0
    assert run("cancel", "tiny").exit_code == 0
    assert run("logs", "jobs/tiny", "--rank", "1", "--attempt", "2").exit_code == 0
    assert client.calls == [("get_job", "jobs/tiny"), ("list_checkpoints", "jobs/tiny", 20), ("get_job", "jobs/tiny"),
                            ("list_checkpoints", "jobs/tiny", 20), ("cancel_job", "jobs/tiny"),
                            ("stream_logs", "jobs/tiny", 1, 2, False)]


def test_logs_tail_asks_the_server_for_the_last_lines(fake):
    fake["client"] = client = FakeClient(jobs=[make_job("tiny")])
    result = run("logs", "tiny", "--tail", "5")
    assert result.exit_code == 0 and "step 2/5 loss 5.1" in result.output
    assert client.calls == [("stream_logs", "jobs/tiny", 0, 0, False, 5)]


def test_tls_comes_from_a_ca_the_environment_or_a_grpcs_server(tmp_path, monkeypatch):
    monkeypatch.delenv("ROUNDHOUSE_TLS_CA", raising=False)
    monkeypatch.setenv("ROUNDHOUSE_TOKEN", "t")
    assert config.client_tls() is None
    monkeypatch.setenv("ROUNDHOUSE_TLS_CA", "/etc/ca.pem")
    assert config.client_tls() == ("/etc/ca.pem", None, None)
    assert config.client_tls("/other.pem")[0] == "/other.pem"
    with pytest.raises(ClientError) as unreadable:  # the CA is read at connect: a missing file is said plainly
        connect(UNUSED_SERVER)
    assert "/etc/ca.pem" in str(unreadable.value) and "ROUNDHOUSE_TLS_CA" in str(unreadable.value)
    monkeypatch.delenv("ROUNDHOUSE_TLS_CA")
    connect(f"grpcs://{UNUSED_SERVER}").close()  # TLS with the system's CAs
    with pytest.raises(ClientError) as scheme:
        connect(f"http://{UNUSED_SERVER}")
    assert "grpcs://HOST:PORT" in str(scheme.value)


@pytest.mark.parametrize("text", ["running", "RUNNING", "Running", "JOB_STATE_RUNNING", "job_state_running",
                                  " running "])
def test_states_parse_case_insensitively_with_or_without_prefix(text):
    assert parse_state(text) == job_pb2.JOB_STATE_RUNNING


@pytest.mark.parametrize("text", ["bogus", "unspecified", "JOB_STATE_UNSPECIFIED", "", "JOB_STATE_"])
def test_unknown_states_are_refused(text):
    with pytest.raises(typer.BadParameter, match="is not a job state"):
        parse_state(text)


def test_list_filters_reach_the_request(fake):
    fake["client"] = client = FakeClient()
    result = run("list", "--state", "running", "--state", "JOB_STATE_QUEUED", "--label", "team=cli",
                 "--label", "size=s", "--page-size", "7")
    assert result.exit_code == 0, result.output
    assert client.calls == [("list_jobs", [job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_QUEUED],
                             {"team": "cli", "size": "s"}, 7, "")]
    assert "no jobs" in result.output


@pytest.mark.parametrize("args", [["--state", "bogus"], ["--label", "novalue"], ["--label", "=v"],
                                  ["--page-size", "0"], ["--output", "yaml"]])
def test_bad_list_arguments_are_usage_errors(args, no_server):
    result = run("list", *args, "--token", "x")
    assert result.exit_code == 2


def test_labels_parse():
    assert parse_labels(["a=b", "c=", "k=v=w"]) == {"a": "b", "c": "", "k": "v=w"}


def test_serve_passes_its_options_to_the_server_settings(monkeypatch, tmp_path):
    import orchestrator.server

    started = []
    monkeypatch.setattr(orchestrator.server, "run_server", started.append)
    data = tmp_path / "data"
    data.mkdir()
    assert run("serve", "--home", str(tmp_path), "--max-ranks", "3", "--data-root", str(data), "--data-root",
               str(tmp_path), "--allow-test-hooks", "--controller-workers", "8").exit_code == 0
    assert run("serve", "--home", str(tmp_path)).exit_code == 0
    configured, default = started
    assert (configured.max_ranks, configured.data_roots, configured.allow_test_hooks,
            configured.controller_workers) == (3, (data, tmp_path), True, 8)
    assert (default.max_ranks, default.data_roots, default.allow_test_hooks, default.controller_workers,
            default.launcher, default.launcher_options) == (None, (), False, 4, "local", {})
    for bad in (["--max-ranks", "0"], ["--controller-workers", "0"], ["--data-root", str(tmp_path / "nope")],
                ["--launcher", "slurm"]):
        result = run("serve", "--home", str(tmp_path), *bad)
        assert result.exit_code == 2, (bad, result.output)
    assert "not an installed launcher (one of: kubernetes, local)" in result.output
    assert len(started) == 2


def test_serve_passes_its_tls_files_and_stream_limit_and_refuses_half_a_pair(monkeypatch, tmp_path):
    import orchestrator.server
    from orchestrator.tls import ServerTls

    started = []
    monkeypatch.setattr(orchestrator.server, "run_server", started.append)
    cert, key, ca = (tmp_path / name for name in ("server.crt", "server.key", "clients.crt"))
    for path in (cert, key, ca):
        path.write_text("-----BEGIN PEM-----\n")
    assert run("serve", "--home", str(tmp_path), "--tls-cert", str(cert), "--tls-key", str(key),
               "--max-streams-per-user", "5").exit_code == 0
    assert run("serve", "--home", str(tmp_path)).exit_code == 0
    assert (started[0].tls, started[0].max_streams_per_user) == (ServerTls(cert, key), 5)
    assert (started[1].tls, started[1].max_streams_per_user) == (None, 32)
    for bad, says in ((["--tls-cert", str(cert)], "--tls-cert and --tls-key go together"),
                      (["--tls-client-ca", str(ca)], "need --tls-cert and --tls-key"),
                      (["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca)],
                       "--tls-client-ca, --tls-ranks-cert and --tls-ranks-key go together")):
        result = run("serve", "--home", str(tmp_path), *bad)
        assert result.exit_code == 2 and says in result.output, (bad, result.output)
    assert len(started) == 2


def test_serve_reads_the_limits_file_and_its_flags_win(monkeypatch, tmp_path):
    import orchestrator.server

    started = []
    monkeypatch.setattr(orchestrator.server, "run_server", started.append)
    limits = tmp_path / "limits.yaml"
    limits.write_text("ranks_per_job: 16\nactive_jobs_per_user: 4\nkubernetes: {images: ['reg.example/*']}\n")
    result = run("serve", "--home", str(tmp_path), "--limits", str(limits), "--max-ranks-per-job", "8",
                 "--max-active-ranks-per-user", "32", "--max-parameters", "1000000", "--max-gpus-per-rank", "1",
                 "--max-active-jobs-per-user", "3")
    assert result.exit_code == 0, result.output
    configured = started[0].limits
    assert (configured.ranks_per_job, configured.active_jobs_per_user, configured.active_ranks_per_user,
            configured.parameters, configured.gpus_per_rank) == (8, 3, 32, 1000000, 1)
    assert configured.kubernetes.images == ["reg.example/*"]
    assert run("serve", "--home", str(tmp_path)).exit_code == 0
    assert started[1].limits.ranks_per_job is None
    limits.write_text("ranks_per_jobs: 16\n")
    result = run("serve", "--home", str(tmp_path), "--limits", str(limits))
    assert result.exit_code == 2 and "ranks_per_jobs: Extra inputs are not permitted" in result.output
    assert len(started) == 2


def test_serve_passes_the_kubernetes_options_to_its_launcher(monkeypatch, tmp_path):
    import orchestrator.server

    started = []
    monkeypatch.setattr(orchestrator.server, "run_server", started.append)
    result = run("serve", "--home", str(tmp_path), "--launcher", "kubernetes", "--namespace", "ml", "--image",
                 "registry.example/trainer:2", "--volume-claim", "shared", "--unschedulable-timeout", "60")
    assert result.exit_code == 0, result.output
    assert started[0].launcher == "kubernetes"
    assert started[0].launcher_options == {"namespace": "ml", "image": "registry.example/trainer:2",
                                           "volume_claim": "shared", "unschedulable_timeout_seconds": 60.0}


# -- rendering ---------------------------------------------------------------------------------------------

def test_get_json_has_numbers_short_enum_names_and_the_events(fake):
    job = make_job("tiny")
    history = [event(1, job_pb2.JOB_STATE_QUEUED, reason="Created"),
               event(2, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_RUNNING, reason="Completed")]
    fake["client"] = FakeClient(jobs=[job], events=history)
    result = run("get", "tiny", "--output", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["name"] == "jobs/tiny" and data["state"] == "SUCCEEDED" and data["state_reason"] == "Completed"
    # 64-bit integers are numbers, not the strings of proto3's JSON mapping; unset fields are null.
    assert data["current_step"] == 5 and data["total_steps"] == 5 and data["restart_count"] == 1
    assert data["last_loss"] == 4.25 and data["tokens_per_second"] == 12345.6
    assert data["checkpoint_step"] == 0 and data["end_time"] is None and data["cancel_requested"] is False
    assert data["spec"]["parallelism"]["dp"] == 2 and data["spec"]["labels"] == {"team": "cli"}
    assert data["attempts"][0]["state"] == "FAILED" and data["attempts"][0]["world_size"] == 2
    assert data["attempts"][0]["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    assert data["attempts"][0]["end_reason"] == "rank 1: exit 17"
    assert data["create_time"].endswith("Z")
    assert [(e["id"], e["from_state"], e["to_state"], e["reason"]) for e in data["events"]] == [
        (1, None, "QUEUED", "Created"), (2, "RUNNING", "SUCCEEDED", "Completed")]
    assert data["checkpoints"] == []
    assert "\x1b[" not in result.stdout  # no colour codes: it must pipe into jq


def test_list_json_holds_every_page_with_all(fake):
    first, second = make_job("b"), make_job("a", state=job_pb2.JOB_STATE_RUNNING)
    fake["client"] = client = FakeClient(pages=[js.ListJobsResponse(jobs=[first], next_page_token="1"),
                                                js.ListJobsResponse(jobs=[second])])
    result = run("list", "--all", "-o", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [j["name"] for j in data["jobs"]] == ["jobs/b", "jobs/a"] and data["next_page_token"] == ""
    assert [(j["state"], j["current_step"]) for j in data["jobs"]] == [("SUCCEEDED", 5), ("RUNNING", 5)]
    assert [c[4] for c in client.calls] == ["", "1"]

    client.calls.clear()
    one_page = json.loads(run("list", "-o", "json").stdout)
    assert [j["name"] for j in one_page["jobs"]] == ["jobs/b"] and one_page["next_page_token"] == "1"
    assert set(client.views) == {js.JOB_VIEW_BASIC}
    run("list", "-o", "json", "--full")
    assert client.views[-1] == js.JOB_VIEW_FULL


def test_list_table_has_a_row_per_job(fake):
    fake["client"] = FakeClient(pages=[js.ListJobsResponse(jobs=[make_job("tiny"), make_job(
        "other", state=job_pb2.JOB_STATE_QUEUED, step=0)], next_page_token="1")])
    result = run("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "STEP/TOTAL", "LOSS", "LAYOUT", "RESTARTS", "AGE"]
    assert lines[1].split() == ["tiny", "SUCCEEDED", "5/5", "4.2500", "1×1×2", "1", "2m"]
    assert lines[2].split()[:3] == ["other", "QUEUED", "0/5"]
    assert "use --all" in result.output


def test_get_table_shows_state_progress_and_attempts(fake):
    fake["client"] = FakeClient(jobs=[make_job("tiny", state_message="[rank 0] done")])
    result = run("get", "tiny")
    assert result.exit_code == 0
    out = result.output
    assert "jobs/tiny" in out and "SUCCEEDED" in out and "Completed: [rank 0] done" in out
    assert "5/5" in out and "4.2500" in out and "12,346" in out and "team=cli" in out
    attempts = out[out.index("attempts"):].splitlines()
    assert attempts[1].split() == ["#", "STATE", "LAYOUT", "WORLD", "SIZE", "START", "STEP", "RAN", "FOR", "END",
                                   "REASON"]
    assert attempts[2].split()[:6] == ["1", "FAILED", "1×1×2", "2", "0", "1m"] and "rank 1: exit 17" in attempts[2]
    assert attempts[3].split()[:6] == ["2", "SUCCEEDED", "1×1×2", "2", "3", "49s"]
    assert "checkpoints" not in out  # none kept


def test_get_lists_the_kept_checkpoints_newest_first(fake):
    kept = [job_pb2.Checkpoint(step=step, attempt=2, layout=job_pb2.Layout(tp=1, pp=1, dp=2),
                               path=f"/ck/step-{step:08d}", size_bytes=307_000_000) for step in (40, 30)]
    fake["client"] = FakeClient(jobs=[make_job("tiny")], checkpoints=kept)
    table = run("get", "tiny").output
    rows = table[table.index("checkpoints (kept, newest first)"):].splitlines()
    assert rows[1].split() == ["STEP", "LAYOUT", "SIZE", "ATTEMPT", "COMMITTED", "PATH"]
    assert rows[2].split()[:4] == ["40", "1×1×2", "307.0", "MB"] and rows[2].endswith("/ck/step-00000040")
    assert rows[3].split()[0] == "30"
    data = json.loads(run("get", "tiny", "-o", "json").stdout)
    assert [c["step"] for c in data["checkpoints"]] == [40, 30]
    assert data["checkpoints"][0]["size_bytes"] == 307_000_000 and data["checkpoints"][0]["path"] == "/ck/step-00000040"


def test_get_shows_checkpoint_paths_whole(fake):
    """However narrow the terminal, a path is printed whole on its line (never cut or folded)."""
    path = "/var/lib/roundhouse/a-rather-long-home-directory/runs/a-job-with-a-long-name/checkpoints/step-00000040"
    kept = [job_pb2.Checkpoint(step=40, attempt=1, layout=job_pb2.Layout(tp=1, pp=1, dp=1), path=path,
                               size_bytes=1_000_000)]
    fake["client"] = FakeClient(jobs=[make_job("tiny")], checkpoints=kept)
    result = runner.invoke(app, ["get", "tiny"], env={**CLEAN_ENV, "COLUMNS": "60"}, catch_exceptions=False)
    assert result.exit_code == 0
    rows = result.output[result.output.index("checkpoints (kept, newest first)"):].splitlines()
    assert rows[1].split() == ["STEP", "LAYOUT", "SIZE", "ATTEMPT", "COMMITTED", "PATH"]
    assert rows[2].split()[:4] == ["40", "1×1×1", "1.0", "MB"] and rows[2].endswith(" " + path)


def test_server_field_violations_are_listed_one_per_line():
    text = describe(bad_request_error())
    assert text.splitlines() == ["INVALID_ARGUMENT: the server refused the request",
                                 "  spec.model.heads: 6 heads are not divisible by parallelism.tp=4",
                                 "  spec.name: required"]
    assert describe(FakeRpcError(grpc.StatusCode.NOT_FOUND, "job jobs/x not found")) == \
        "NOT_FOUND: job jobs/x not found"


def test_submit_shows_the_servers_violations(tmp_path, fake):
    path = tmp_path / "ok.yaml"
    path.write_text("name: fine\n")
    fake["client"] = FakeClient(create_error=ClientError(describe(bad_request_error()),
                                                         grpc.StatusCode.INVALID_ARGUMENT))
    result = run("submit", str(path))
    assert result.exit_code == 1
    assert "spec.model.heads: 6 heads are not divisible" in result.output and "spec.name: required" in result.output


def test_logs_write_the_chunks_as_they_are(fake):
    fake["client"] = FakeClient(jobs=[make_job("tiny")])
    result = run("logs", "tiny")
    assert result.exit_code == 0 and result.stdout == "step 1/5 loss 5.5\nstep 2/5 loss 5.1\n"


# -- submit --wait and cancel against the fake -------------------------------------------------------------

def _updates(*updates):
    def stream():
        yield from updates
    return stream


def _then_fail(code, *updates):
    def stream():
        yield from updates
        raise ClientError(f"{code.name}: gone", code)
    return stream


def test_wait_shows_events_and_exits_by_the_final_state(tmp_path, fake):
    path = tmp_path / "ok.yaml"
    path.write_text("name: tiny\ntraining: {steps: 5}\n")
    running = make_job("tiny", job_pb2.JOB_STATE_RUNNING, step=2)
    failed = make_job("tiny", job_pb2.JOB_STATE_FAILED, step=3)
    failed.state_message = "rank 0 exited with code 1; restart budget of 0 spent"
    fake["client"] = FakeClient(watches=[_updates(
        js.JobUpdate(job=running, events=[event(1, job_pb2.JOB_STATE_QUEUED, reason="Created"),
                                          event(2, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_QUEUED,
                                                reason="RanksRunning")]),
        js.JobUpdate(job=failed, events=[event(3, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_RUNNING,
                                               reason="RankFailed", message="rank 0 exited with code 1")]))])
    result = run("submit", str(path), "--wait")
    assert result.exit_code == 1
    out = result.output
    assert "jobs/tiny created" in out
    assert "StateChanged" in out and "— → QUEUED" in out and "QUEUED → RUNNING" in out
    assert "RUNNING → FAILED" in out and "RankFailed" in out and "rank 0 exited with code 1" in out
    assert "jobs/tiny: FAILED" in out


def test_wait_reconnects_after_the_last_event_seen(tmp_path, fake):
    path = tmp_path / "ok.yaml"
    path.write_text("name: tiny\ntraining: {steps: 5}\n")
    running = make_job("tiny", job_pb2.JOB_STATE_RUNNING, step=2)
    done = make_job("tiny", job_pb2.JOB_STATE_SUCCEEDED)
    fake["client"] = client = FakeClient(watches=[
        _then_fail(grpc.StatusCode.UNAVAILABLE,
                   js.JobUpdate(job=running, events=[event(7, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_LAUNCHING)])),
        _then_fail(grpc.StatusCode.UNAVAILABLE),  # still down
        _updates(js.JobUpdate(job=running)),  # the stream closes before the job ends: try again
        _updates(js.JobUpdate(job=done, events=[event(8, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_RUNNING)]))])
    result = run("submit", str(path), "--wait")
    assert result.exit_code == 0, result.output
    assert [c[2] for c in client.calls if c[0] == "watch_job"] == [0, 7, 7, 7]
    assert result.output.count("reconnecting") == 2 and "reconnected" in result.output
    assert "RUNNING → SUCCEEDED" in result.output and "jobs/tiny: SUCCEEDED" in result.output


def test_wait_gives_up_when_the_server_stays_away(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(cli, "RECONNECT_SECONDS", 0.5)
    path = tmp_path / "ok.yaml"
    path.write_text("name: tiny\n")
    fake["client"] = FakeClient(watches=[_then_fail(grpc.StatusCode.UNAVAILABLE)] * 50)
    result = run("submit", str(path), "--wait")
    assert result.exit_code == 1 and "UNAVAILABLE" in result.output


def test_watch_follows_a_submitted_job_to_its_end(fake):
    running = make_job("tiny", job_pb2.JOB_STATE_RUNNING, step=2)
    done = make_job("tiny", job_pb2.JOB_STATE_CANCELLED)
    fake["client"] = client = FakeClient(watches=[_updates(
        js.JobUpdate(job=running, events=[event(4, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_LAUNCHING)]),
        js.JobUpdate(job=done, events=[event(5, job_pb2.JOB_STATE_CANCELLED, job_pb2.JOB_STATE_RUNNING,
                                             reason="CancelRequested")]))])
    result = run("watch", "tiny")
    assert result.exit_code == 1  # it ended, but not SUCCEEDED
    assert "LAUNCHING → RUNNING" in result.output and "RUNNING → CANCELLED" in result.output
    assert "jobs/tiny: CANCELLED" in result.output
    assert client.calls == [("watch_job", "jobs/tiny", 0)]


def test_wait_does_not_retry_a_refusal(tmp_path, fake):
    path = tmp_path / "ok.yaml"
    path.write_text("name: tiny\n")
    fake["client"] = client = FakeClient(watches=[_then_fail(grpc.StatusCode.PERMISSION_DENIED)] * 5)
    result = run("submit", str(path), "--wait")
    assert result.exit_code == 1 and "PERMISSION_DENIED" in result.output
    assert len([c for c in client.calls if c[0] == "watch_job"]) == 1


def test_cancel_waits_until_the_job_is_cancelled(fake, monkeypatch):
    monkeypatch.setattr(cli, "POLL_SECONDS", 0.01)
    running = make_job("tiny", job_pb2.JOB_STATE_RUNNING, cancel_requested=True)
    fake["client"] = client = FakeClient(cancel=running, gets=[running, make_job("tiny", job_pb2.JOB_STATE_CANCELLED)])
    result = run("cancel", "tiny")
    assert result.exit_code == 0 and "jobs/tiny: CANCELLED" in result.output
    assert [c[0] for c in client.calls] == ["cancel_job", "get_job", "get_job"]

    fake["client"] = client = FakeClient(cancel=running)
    result = run("cancel", "tiny", "--no-wait")
    assert result.exit_code == 0 and "cancel requested" in result.output
    assert [c[0] for c in client.calls] == ["cancel_job"]


def test_cancel_of_a_finished_job_fails(fake):
    fake["client"] = FakeClient(cancel=ClientError("FAILED_PRECONDITION: job jobs/tiny already ended (SUCCEEDED); "
                                                   "nothing to cancel", grpc.StatusCode.FAILED_PRECONDITION))
    result = run("cancel", "tiny")
    assert result.exit_code == 1 and "FAILED_PRECONDITION" in result.output


def test_the_real_client_turns_stream_errors_into_client_errors():
    client = JobClient(UNUSED_SERVER, "t")
    try:
        with pytest.raises(ClientError) as caught:
            list(client.watch_job("x"))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()


class _UnavailableTwice(job_service_pb2_grpc.JobServiceServicer):
    """A JobService whose GetJob answers UNAVAILABLE twice, then the job: a server that was busy for a moment."""

    def __init__(self):
        self.calls = 0

    def GetJob(self, request, context):
        self.calls += 1
        if self.calls <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
        return job_pb2.Job(name=request.name)


def test_the_real_client_tries_again_when_the_server_is_unavailable_for_a_moment():
    servicer = _UnavailableTwice()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = JobClient(f"127.0.0.1:{port}", "t")
    try:
        assert client.get_job("tiny").name == "jobs/tiny"
        assert servicer.calls == 3
    finally:
        client.close()
        server.stop(None)


# -- end to end: `roundhouse serve` in its own process -----------------------------------------------------

def free_ports(count: int) -> list[int]:
    """Distinct ports nobody listens on (all held open at once, so that they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def roundhouse_command() -> list[str]:
    script = Path(sys.executable).with_name("roundhouse")
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


class ServeProcess:
    """`roundhouse serve` on free ports with its own home; stop() leaves no process behind."""

    def __init__(self, home: Path):
        self.home = home
        self.grpc_port, self.http_port = free_ports(2)
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.log = home.parent / f"{home.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        env = {**os.environ, "ROUNDHOUSE_HOME": str(self.home)}
        env.pop("ROUNDHOUSE_SERVER", None)
        env.pop("ROUNDHOUSE_TOKEN", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*roundhouse_command(), "serve", "--home", str(self.home), "--grpc-port", str(self.grpc_port),
                 "--http-port", str(self.http_port), "--allow-test-hooks"], env=env, stdout=log,
                stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.address, process=self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise AssertionError(f"server did not start:\n{self.log.read_text()[-3000:]}") from None
        return self

    @property
    def env(self) -> dict[str, str]:
        return {"ROUNDHOUSE_SERVER": self.address, "ROUNDHOUSE_TOKEN": (self.home / "admin-token").read_text().strip()}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cancel_unfinished(self) -> None:
        """So that no rank outlives the test: cancel whatever is still running, and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        listed = run("list", "--all", "-o", "json", env=self.env)
        for job in json.loads(listed.stdout or '{"jobs": []}')["jobs"]:
            if job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                run("cancel", job["name"], "--timeout", "60", env=self.env)


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    server = ServeProcess(tmp_path_factory.mktemp("cli-e2e") / "home").start()
    try:
        yield server
    finally:
        server.cancel_unfinished()
        server.stop()


def spec_file(tmp_path: Path, name: str, steps: int = 5, env: dict | None = None) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name, steps=steps, env=json.dumps(env or {})))
    return path


@pytest.mark.slow
def test_submit_wait_list_get_logs_and_cancel(plane, tmp_path):
    env = plane.env
    path = spec_file(tmp_path, "cli-tiny")

    submitted = run("submit", str(path), "--wait", env=env)
    assert submitted.exit_code == 0, submitted.output
    assert "jobs/cli-tiny created" in submitted.output
    assert "QUEUED → LAUNCHING" in submitted.output and "RUNNING → SUCCEEDED" in submitted.output
    assert "jobs/cli-tiny: SUCCEEDED" in submitted.output

    listed = run("list", "--output", "json", env=env)
    assert listed.exit_code == 0
    jobs = {j["name"]: j for j in json.loads(listed.stdout)["jobs"]}
    assert jobs["jobs/cli-tiny"]["state"] == "SUCCEEDED" and jobs["jobs/cli-tiny"]["current_step"] == 5
    assert "cli-tiny" in run("list", "--state", "SUCCEEDED", "--label", "team=cli", env=env).output
    assert "cli-tiny" not in run("list", "--state", "running", env=env).output

    got = run("get", "cli-tiny", env=env)
    assert got.exit_code == 0, got.output
    assert "SUCCEEDED" in got.output and "5/5" in got.output and "1×1×1" in got.output
    got = json.loads(run("get", "jobs/cli-tiny", "-o", "json", env=env).stdout)
    assert got["attempts"][0]["state"] == "SUCCEEDED" and got["attempts"][0]["world_size"] == 1
    events = got["events"]  # the whole history, oldest first
    assert events[0]["reason"] == "Created" and events[0]["to_state"] == "QUEUED" and events[0]["from_state"] is None
    assert events[-1]["to_state"] == "SUCCEEDED" and [e["id"] for e in events] == sorted(e["id"] for e in events)

    log = run("logs", "cli-tiny", "--rank", "0", env=env)
    assert log.exit_code == 0
    assert "step 1/5 loss" in log.stdout and "step 5/5 loss" in log.stdout

    again = run("submit", str(path), env=env)
    assert again.exit_code == 1 and "ALREADY_EXISTS" in again.output

    finished = run("cancel", "cli-tiny", env=env)
    assert finished.exit_code == 1 and "FAILED_PRECONDITION" in finished.output

    missing = run("get", "nope", env=env)
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output
    assert processes_of("cli-tiny") == []


@pytest.mark.slow
def test_cancel_stops_a_running_job(plane, tmp_path):
    env = plane.env
    path = spec_file(tmp_path, "cli-long", steps=1000, env={"RH_TEST_STEP_SLEEP": "0.05"})
    assert run("submit", str(path), env=env).exit_code == 0
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        job = json.loads(run("get", "cli-long", "-o", "json", env=env).stdout)
        if job["state"] == "RUNNING" and job["current_step"] >= 2:
            break
        time.sleep(0.2)
    assert processes_of("cli-long")
    cancelled = run("cancel", "cli-long", env=env)
    assert cancelled.exit_code == 0, cancelled.output
    assert "jobs/cli-long: CANCELLED" in cancelled.output
    assert processes_of("cli-long") == []


@pytest.mark.slow
def test_submit_wait_survives_a_control_plane_restart(tmp_path):
    """`submit --wait` in its own process; the server is stopped mid-run and started again on the same
    port: the watch reconnects from the last event and the CLI still exits 0 on SUCCEEDED."""
    server = ServeProcess(tmp_path / "home").start()
    watcher = None
    try:
        env = {**os.environ, **server.env}
        path = spec_file(tmp_path, "cli-restart", steps=40, env={"RH_TEST_STEP_SLEEP": "0.1"})
        watcher = subprocess.Popen([*roundhouse_command(), "submit", str(path), "--wait"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            got = run("get", "cli-restart", "-o", "json", env=server.env)
            if got.exit_code == 0 and json.loads(got.stdout)["current_step"] >= 3:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the job never got going")
        server.stop()
        time.sleep(2.0)  # the ranks train on with nobody listening; the watcher retries
        server.start()
        output, _ = watcher.communicate(timeout=DEADLINE)
        assert watcher.returncode == 0, output
        assert "lost the control plane (UNAVAILABLE)" in output and "reconnected" in output
        assert "RUNNING → SUCCEEDED" in output and "jobs/cli-restart: SUCCEEDED" in output
        assert output.count("QUEUED → LAUNCHING") == 1  # no event shown twice after the reconnect
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        server.cancel_unfinished()
        server.stop()
    assert processes_of("cli-restart") == []


def test_tokens_are_created_listed_and_revoked_on_the_database(tmp_path):
    from orchestrator.auth import Principal, UserTokens
    from orchestrator.config import default_db_url
    from orchestrator.store import Database

    home = str(tmp_path / "home")
    created = run("token", "create", "--user", "alice", "--home", home)
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert run("token", "create", "--user", "bob", "--role", "admin", "--home", home).exit_code == 0

    db = Database(default_db_url(tmp_path / "home"))
    try:
        assert UserTokens(db).lookup(token) == Principal("alice", "user")  # what the server checks
        listed = run("token", "list", "--home", home).stdout.splitlines()
        assert [line.split() for line in listed] == [["USER", "ROLE", "TOKENS"], ["alice", "user", "1"],
                                                     ["bob", "admin", "1"]]
        revoked = run("token", "revoke", "--user", "alice", "--home", home)
        assert revoked.exit_code == 0 and "revoked 1 token(s) of alice" in revoked.stdout
        assert UserTokens(db).lookup(token) is None
    finally:
        db.dispose()
    assert run("token", "revoke", "--user", "alice", "--home", home).exit_code == 1  # none left
    bad = run("token", "create", "--user", "carol", "--role", "root", "--home", home)
    assert bad.exit_code == 2 and "role must be one of admin, user" in bad.output


def test_mup_coord_check_runs_the_rank_side_tool_and_passes_on_its_refusal(tmp_path):
    """`roundhouse mup coord-check` runs trainers.coord_check in a child interpreter (the CLI imports no
    rank-side code); a spec it cannot read is a clean exit 2 naming the file, not a traceback."""
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([*roundhouse_command(), "mup", "coord-check", str(missing), "--steps", "2"],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
