"""The JobService over real gRPC on both databases: status codes, field paths, pagination, auth, and that
a refused request writes nothing."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import func, select

from orchestrator.lifecycle import transition
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import Event, Job, JobState
from roundhouse.v1 import job_pb2, job_service_pb2 as js

from tests.unit.test_spec import BAD_INPUTS


def spec(name: str = "tiny", **sections) -> job_pb2.JobSpec:
    return spec_to_proto(parse_spec({"name": name, **sections}))


def create(client, name: str = "tiny", **sections) -> job_pb2.Job:
    return client.jobs.CreateJob(js.CreateJobRequest(spec=spec(name, **sections)), metadata=client.metadata)


def rows(plane, model) -> int:
    with plane.db.read() as session:
        return session.scalar(select(func.count()).select_from(model))


def field_violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


def test_create_then_get(client):
    created = create(client, labels={"team": "a"})
    assert created.name == "jobs/tiny"
    assert created.state == job_pb2.JOB_STATE_QUEUED
    assert created.owner == "admin"
    assert created.spec.training.steps == 100  # defaults are filled in and returned
    got = client.jobs.GetJob(js.GetJobRequest(name="jobs/tiny"), metadata=client.metadata)
    assert got.uid == created.uid and got.spec == created.spec


def test_same_name_is_already_exists_and_writes_nothing(client, api_plane):
    create(client)
    with pytest.raises(grpc.RpcError) as info:
        create(client, training={"steps": 7})
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rows(api_plane, Job) == 1 and rows(api_plane, Event) == 1


@pytest.mark.parametrize(("data", "field"), BAD_INPUTS)
def test_bad_spec_is_invalid_argument_naming_the_field_and_writes_nothing(client, api_plane, data, field):
    message, unknown_paths = _proto_from_possibly_invalid(data)
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=message), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # On the wire an unknown field has a number, not a name: it is named by its place and number.
    expected = ".".join(("spec", *field.split(".")[:-1], "#100")) if unknown_paths else f"spec.{field}"
    assert expected in field_violations(info.value)
    assert expected in info.value.details()
    assert rows(api_plane, Job) == 0 and rows(api_plane, Event) == 0


def _proto_from_possibly_invalid(data: dict) -> tuple[job_pb2.JobSpec, list]:
    """Builds the message a client would send for this (invalid) spec; unknown fields become unknown proto
    fields, the way a newer client's message reaches this server."""
    from google.protobuf import json_format

    known, unknown_paths = _split_unknown(data, job_pb2.JobSpec.DESCRIPTOR)
    message = json_format.ParseDict(known, job_pb2.JobSpec())
    for path in unknown_paths:
        target = message
        for part in path[:-1]:
            target = getattr(target, part)
        # An unknown varint field 100 inside the message at that path.
        target.MergeFromString(b"\xa0\x06\x01")
    return message, unknown_paths


def _split_unknown(data: dict, descriptor, path=()):
    known, unknown = {}, []
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            unknown.append((*path, key))
        elif isinstance(value, dict) and field.message_type and not field.message_type.GetOptions().map_entry:
            known[key], more = _split_unknown(value, field.message_type, (*path, key))
            unknown += more
        else:
            known[key] = value
    return known, unknown


def test_unknown_field_is_reported_with_its_number(client):
    message = spec()
    message.model.MergeFromString(b"\xa0\x06\x01")
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=message), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == ["spec.model.#100"]


def test_missing_spec_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == ["spec"]


def test_get_unknown_job_is_not_found(client):
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.GetJob(js.GetJobRequest(name="jobs/nope"), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_get_malformed_name_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.GetJob(js.GetJobRequest(name="projects/x/jobs/Bad"), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == ["name"]


def test_list_pages_through_every_job_newest_first(client):
    for i in range(7):
        create(client, f"job-{i}")
    seen, token = [], ""
    while True:
        page = client.jobs.ListJobs(js.ListJobsRequest(page_size=3, page_token=token), metadata=client.metadata)
        assert len(page.jobs) <= 3
        seen += [j.name for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"jobs/job-{i}" for i in reversed(range(7))]


def test_list_filters_by_state_and_labels(client):
    create(client, "a", labels={"team": "x", "size": "s"})
    create(client, "b", labels={"team": "x", "size": "l"})
    create(client, "c", labels={"team": "y"})
    client.jobs.CancelJob(js.CancelJobRequest(name="jobs/c"), metadata=client.metadata)

    def names(**kw):
        response = client.jobs.ListJobs(js.ListJobsRequest(**kw), metadata=client.metadata)
        return sorted(j.name.removeprefix("jobs/") for j in response.jobs)

    assert names(labels={"team": "x"}) == ["a", "b"]
    assert names(labels={"team": "x", "size": "l"}) == ["b"]
    assert names(states=[job_pb2.JOB_STATE_QUEUED]) == ["a", "b", "c"]  # cancel is requested, not yet done
    assert names(states=[job_pb2.JOB_STATE_SUCCEEDED]) == []


def test_page_token_from_another_filter_is_refused(client):
    for i in range(3):
        create(client, f"job-{i}")
    page = client.jobs.ListJobs(js.ListJobsRequest(page_size=1), metadata=client.metadata)
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.ListJobs(js.ListJobsRequest(page_size=1, page_token=page.next_page_token,
                                                labels={"team": "x"}), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == ["page_token"]


def test_negative_page_size_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.ListJobs(js.ListJobsRequest(page_size=-1), metadata=client.metadata)
    assert field_violations(info.value) == ["page_size"]


def test_cancel_marks_the_job_and_records_an_event(client, api_plane):
    create(client)
    job = client.jobs.CancelJob(js.CancelJobRequest(name="jobs/tiny"), metadata=client.metadata)
    assert job.cancel_requested
    with api_plane.db.read() as session:
        reasons = [e.reason for e in session.scalars(select(Event).order_by(Event.id))]
    assert reasons == ["Created", "CancelRequested"]


def test_cancel_of_a_finished_job_is_failed_precondition(client, api_plane):
    create(client)
    with api_plane.db.session() as session:
        session.get(Job, "tiny").state = "SUCCEEDED"
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CancelJob(js.CancelJobRequest(name="jobs/tiny"), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer not-a-token")], [("authorization", "Basic x")]],
                         ids=["none", "wrong", "not-bearer"])
def test_calls_without_a_valid_token_are_unauthenticated(client, api_plane, metadata):
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec()), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        list(client.jobs.WatchJob(js.WatchJobRequest(name="jobs/tiny"), metadata=metadata))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rows(api_plane, Job) == 0


def test_health_and_reflection_are_served_without_a_token(client):
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="roundhouse.v1.JobService")).status == \
        health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for s in next(responses).list_services_response.service}
    assert {"roundhouse.v1.JobService", "roundhouse.v1.TrainerService", "grpc.health.v1.Health"} <= services


def test_watch_of_a_finished_job_sends_its_history_and_ends(client, api_plane):
    create(client)
    client.jobs.CancelJob(js.CancelJobRequest(name="jobs/tiny"), metadata=client.metadata)
    with api_plane.db.session() as session:
        transition(session, session.get(Job, "tiny"), JobState.CANCELLED, "CancelRequested")
    updates = list(client.jobs.WatchJob(js.WatchJobRequest(name="jobs/tiny"), metadata=client.metadata))
    reasons = [e.reason for u in updates for e in u.events]
    assert reasons == ["Created", "CancelRequested", "CancelRequested"]
    assert updates[-1].job.state == job_pb2.JOB_STATE_CANCELLED
