"""Untrusted input at the JobService and SweepService, over real gRPC on both databases: full-match names,
bad enums and hostile page tokens refused as INVALID_ARGUMENT naming the field, internal errors answered as
INTERNAL with an id (never their text), echoed input clipped, and the lists' BASIC and FULL views."""

from __future__ import annotations

import base64
import json
import logging

import grpc
import pytest
from sqlalchemy import func, select

from contract.spec import parse_spec, spec_to_proto
from orchestrator.service import jobs as jobs_service
from orchestrator.store import Job
from roundhouse.v1 import job_service_pb2 as js, sweep_service_pb2 as ss, sweep_service_pb2_grpc

from tests.integration.test_api import create, field_violations


def call_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def forged(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


# -- names ---------------------------------------------------------------------------------------------------


def test_a_trailing_newline_names_no_job(client):
    """A cancel of "nl-test\\n" must not reach nl-test (a "$" pattern would have matched it)."""
    create(client, "nl-test")
    calls = [lambda: client.jobs.GetJob(js.GetJobRequest(name="nl-test\n"), metadata=client.metadata),
             lambda: client.jobs.CancelJob(js.CancelJobRequest(name="nl-test\n"), metadata=client.metadata),
             lambda: client.jobs.GetJob(js.GetJobRequest(name="jobs/nl-test\n"), metadata=client.metadata)]
    for call in calls:
        error = call_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(error) == ["name"]
    job = client.jobs.GetJob(js.GetJobRequest(name="nl-test"), metadata=client.metadata)
    assert not job.cancel_requested


def test_an_overlong_name_is_not_echoed_whole(client):
    error = call_error(lambda: client.jobs.GetJob(js.GetJobRequest(name="x" * 100_000), metadata=client.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 400


def test_a_spec_with_a_thousand_bad_fields_gets_a_short_answer(client, api_plane):
    spec = spec_to_proto(parse_spec({"name": "many"}))
    spec.labels.update({f"bad key {i}": "v" for i in range(60)})
    spec.env.update({f"LD_{i}": "v" for i in range(60)})
    error = call_error(lambda: client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=client.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = field_violations(error)
    assert 1 < len(fields) <= 21 and "more violation(s) not shown" in error.details()
    assert len(error.details()) < 2500
    assert sum(len(k) + len(v) for k, v in error.trailing_metadata()) < 8192


# -- enums and page tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("request_", "field"), [
    (js.ListJobsRequest(states=[99]), "states"),
    (js.ListJobsRequest(states=[0]), "states"),
    (js.ListJobsRequest(view=7), "view"),
    (js.ListJobsRequest(view=-1), "view"),
    (js.ListJobsRequest(page_size=-1), "page_size"),
    (js.ListJobsRequest(labels={"team\n": "a"}), "labels.team\n"),
    (js.ListJobsRequest(labels={"team": "a\0b"}), "labels.team"),
    (js.ListJobsRequest(page_token="not base64 ✗"), "page_token"),
    (js.ListJobsRequest(page_token="A" * 100_000), "page_token"),
    (js.ListJobsRequest(page_token=forged([1, 2])), "page_token"),
])
def test_bad_list_requests_are_invalid_argument_naming_the_field(client, request_, field):
    error = call_error(lambda: client.jobs.ListJobs(request_, metadata=client.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == [field]


def test_forged_page_tokens_never_reach_a_query(client):
    """A token of the right filter, with a name no job has, a time with a zone or out of range, a NUL: refused."""
    create(client, "a")
    create(client, "b")
    page = client.jobs.ListJobs(js.ListJobsRequest(page_size=1), metadata=client.metadata)
    data = json.loads(base64.urlsafe_b64decode(page.next_page_token))
    for change in ({"n": "x\0y"}, {"n": "A" * 5000}, {"n": 5}, {"t": "2024-01-01T00:00:00+05:00"},
                   {"t": "99999-01-01"}, {"t": None}, {"f": "other"}):
        error = call_error(lambda change=change: client.jobs.ListJobs(
            js.ListJobsRequest(page_size=1, page_token=forged({**data, **change})), metadata=client.metadata))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, change
        assert field_violations(error) == ["page_token"]
    assert [j.name for j in client.jobs.ListJobs(js.ListJobsRequest(page_size=1, page_token=page.next_page_token),
                                                 metadata=client.metadata).jobs] == ["jobs/a"]


def test_forged_checkpoint_tokens_are_refused(client):
    create(client, "c")
    for step in (2**70, -1, "1", 1.5):
        error = call_error(lambda step=step: client.jobs.ListCheckpoints(
            js.ListCheckpointsRequest(parent="jobs/c", page_token=forged({"s": step, "j": "c", "p": 50})),
            metadata=client.metadata))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(error) == ["page_token"]


# -- internal errors -----------------------------------------------------------------------------------------


def test_an_internal_error_is_internal_with_an_id_and_never_its_text(client, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("SELECT secret FROM jobs WHERE name = 'x'")

    monkeypatch.setattr(jobs_service, "get_job", broken)
    with caplog.at_level(logging.ERROR, logger="orchestrator.api.errors"):
        error = call_error(lambda: client.jobs.GetJob(js.GetJobRequest(name="jobs/x"), metadata=client.metadata))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "SELECT" not in error.details() and "secret" not in error.details()
    error_id = error.details().split("(id ")[1].split(")")[0]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_an_internal_error_in_a_stream_is_internal_too(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("/var/lib/secret/path")

    monkeypatch.setattr(jobs_service, "log_source", broken)
    error = call_error(lambda: list(client.jobs.StreamLogs(js.StreamLogsRequest(name="jobs/x"),
                                                           metadata=client.metadata)))
    assert error.code() == grpc.StatusCode.INTERNAL and "secret" not in error.details()


# -- views ---------------------------------------------------------------------------------------------------


def test_list_jobs_is_basic_by_default_and_full_on_request(client):
    created = create(client, "viewed", env={"BIG": "x" * 4000}, labels={"team": "a"}, parallelism={"dp": 2},
                     training={"global_batch_size": 8, "micro_batch_size": 2})
    for view in (js.JOB_VIEW_UNSPECIFIED, js.JOB_VIEW_BASIC):
        [basic] = client.jobs.ListJobs(js.ListJobsRequest(view=view), metadata=client.metadata).jobs
        assert basic.spec.parallelism.dp == 2 and not basic.spec.env and not basic.spec.name
        assert (basic.name, basic.state, basic.total_steps) == (created.name, created.state, created.total_steps)
    [full] = client.jobs.ListJobs(js.ListJobsRequest(view=js.JOB_VIEW_FULL), metadata=client.metadata).jobs
    assert full.spec == created.spec


def test_a_page_of_big_specs_still_lists(client, api_plane):
    """Two jobs with 32 KiB of env each: the basic list stays small (the issue's RESOURCE_EXHAUSTED list)."""
    for name in ("big-a", "big-b"):
        create(client, name, env={f"V{i}": "x" * 4000 for i in range(8)})
    page = client.jobs.ListJobs(js.ListJobsRequest(), metadata=client.metadata)
    assert len(page.jobs) == 2 and page.ByteSize() < 2000
    with api_plane.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2


def test_list_sweeps_is_basic_by_default_and_full_on_request(client):
    from tests.integration.test_sweeps import sweep_data
    from contract.sweep import parse_sweep, sweep_to_proto

    stub = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
    spec, _ = parse_sweep(sweep_data())
    stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)), metadata=client.metadata)
    [basic] = stub.ListSweeps(ss.ListSweepsRequest(), metadata=client.metadata).sweeps
    assert not basic.HasField("spec") and len(basic.trials) == 2
    [full] = stub.ListSweeps(ss.ListSweepsRequest(view=ss.SWEEP_VIEW_FULL), metadata=client.metadata).sweeps
    assert full.spec.name == "lr"
    error = call_error(lambda: stub.ListSweeps(ss.ListSweepsRequest(view=9), metadata=client.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(error) == ["view"]
