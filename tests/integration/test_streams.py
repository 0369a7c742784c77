"""Streams on the grpc.aio server, on both databases: many open watches hold no worker thread (unary calls
and the health check still answer), each user may hold only so many, and StreamLogs sends a log of any size
in bounded chunks from an offset or its tail."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract.spec import parse_spec, spec_to_proto
from orchestrator.auth import create_token
from orchestrator.controller import ReconcilerSettings
from orchestrator.launcher.logs import LOG_READ_BYTES
from orchestrator.server import UNARY_THREADS, ControlPlane, ServerSettings
from orchestrator.store import Attempt, AttemptState, Job
from roundhouse.v1 import job_service_pb2 as js, job_service_pb2_grpc
from tests.support.waiting import DEADLINE

# More than the gRPC pool's threads: before grpc.aio, 64 open watches starved every unary call.
STREAMS = UNARY_THREADS + 36
USERS = 4  # each holds STREAMS / USERS streams, within the default limit of 32


@pytest.fixture
def plane(db_url, tmp_path) -> Iterator[ControlPlane]:
    plane = ControlPlane(ServerSettings(home=tmp_path / "home", db_url=db_url, grpc_port=0, http_port=0,
                                        reconcile=False, max_streams_per_user=32,
                                        reconciler=ReconcilerSettings(interval_seconds=0.2)))
    plane.start()
    yield plane
    plane.stop()


def _create(stub, metadata, name: str) -> None:
    spec = parse_spec({"name": name})
    stub.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=metadata, timeout=DEADLINE)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


class _Watches:
    """Open WatchJob streams, each read on a thread of this test until the test cancels it."""

    def __init__(self, stub):
        self.stub = stub
        self.calls = []
        self.first_update = threading.Semaphore(0)

    def open(self, name: str, metadata, stub=None) -> None:
        call = (stub or self.stub).WatchJob(js.WatchJobRequest(name=name), metadata=metadata)
        self.calls.append(call)

        def read() -> None:
            try:
                for _ in call:
                    self.first_update.release()
            except grpc.RpcError:
                pass  # cancelled at the end of the test

        threading.Thread(target=read, daemon=True).start()

    def close(self) -> None:
        for call in self.calls:
            call.cancel()


def test_many_open_watches_do_not_starve_unary_calls_or_the_health_check(plane):
    admin = _bearer((plane.settings.home / "admin-token").read_text().strip())
    channel = grpc.insecure_channel(plane.grpc_address)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    for index in range(4):
        _create(stub, admin, f"watched-{index}")
    tokens = [create_token(plane.db, f"user-{u}", "user") for u in range(USERS)]
    watches = _Watches(stub)
    with ExitStack() as cleanup:
        cleanup.callback(channel.close)
        cleanup.callback(watches.close)
        user_stubs = []
        for _ in range(USERS):  # each user on a connection of its own, as separate clients are
            user_channel = grpc.insecure_channel(plane.grpc_address)
            cleanup.callback(user_channel.close)
            user_stubs.append(job_service_pb2_grpc.JobServiceStub(user_channel))
        for index in range(STREAMS):
            user = index % USERS
            watches.open(f"jobs/watched-{index % 4}", _bearer(tokens[user]), user_stubs[user])
        for _ in range(STREAMS):  # every stream is open and has sent the job as it is
            assert watches.first_update.acquire(timeout=DEADLINE)

        # All of them still open, a unary call and the health check answer.
        job = stub.GetJob(js.GetJobRequest(name="jobs/watched-0"), metadata=admin, timeout=DEADLINE)
        assert job.name == "jobs/watched-0"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert sum(plane.streams.open_streams(f"user-{u}") for u in range(USERS)) == STREAMS
        assert all(call.running() for call in watches.calls)


def test_a_user_past_the_stream_limit_is_refused_naming_it_and_others_are_not(db_url, tmp_path):
    plane = ControlPlane(ServerSettings(home=tmp_path / "home", db_url=db_url, grpc_port=0, http_port=0,
                                        reconcile=False, max_streams_per_user=2))
    plane.start()
    channel = grpc.insecure_channel(plane.grpc_address)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    watches = _Watches(stub)
    try:
        admin = _bearer((plane.settings.home / "admin-token").read_text().strip())
        _create(stub, admin, "limited")
        alice, bob = _bearer(create_token(plane.db, "alice", "user")), _bearer(create_token(plane.db, "bob", "user"))
        for _ in range(2):
            watches.open("jobs/limited", alice)
        for _ in range(2):
            assert watches.first_update.acquire(timeout=DEADLINE)

        third = stub.WatchJob(js.WatchJobRequest(name="jobs/limited"), metadata=alice, timeout=DEADLINE)
        with pytest.raises(grpc.RpcError) as refused:
            next(third)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 per user" in refused.value.details()
        assert "--max-streams-per-user" in refused.value.details()
        logs = stub.StreamLogs(js.StreamLogsRequest(name="jobs/limited"), metadata=alice, timeout=DEADLINE)
        with pytest.raises(grpc.RpcError) as refused_logs:  # logs count too
            next(logs)
        assert refused_logs.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        watches.open("jobs/limited", bob)  # another user is not held to alice's streams
        assert watches.first_update.acquire(timeout=DEADLINE)

        watches.calls[0].cancel()  # a closed stream frees its place
        deadline = time.monotonic() + DEADLINE
        while True:
            again = stub.WatchJob(js.WatchJobRequest(name="jobs/limited"), metadata=alice, timeout=DEADLINE)
            try:
                assert next(again).job.name == "jobs/limited"
                break
            except grpc.RpcError as exc:  # the server may not have seen the cancel yet
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
        again.cancel()
    finally:
        watches.close()
        channel.close()
        plane.stop()


# -- StreamLogs ---------------------------------------------------------------------------------------------

@pytest.fixture
def big_log(plane) -> tuple[job_service_pb2_grpc.JobServiceStub, list, bytes]:
    """A job with one attempt whose rank 0 wrote a log larger than gRPC's 4 MiB message limit, with a
    two-byte character astride a read boundary."""
    admin = _bearer((plane.settings.home / "admin-token").read_text().strip())
    channel = grpc.insecure_channel(plane.grpc_address)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    _create(stub, admin, "chatty")
    with plane.db.session() as session:
        job = session.get(Job, "chatty")
        job.attempts.append(Attempt(job_name="chatty", number=1, state=AttemptState.SUCCEEDED, tp=1, pp=1, dp=1,
                                    world_size=1))
    lines = b"".join(b"step %07d loss 1.2345 tokens/s 9999.0\n" % i for i in range(150_000))
    data = b"x" * (LOG_READ_BYTES - 1) + "é".encode() + lines  # é's two bytes straddle the first read's end
    path = plane.launcher.log_path("chatty", 1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    assert len(data) > 4 * 1024 * 1024
    yield stub, admin, data
    channel.close()


def test_a_log_larger_than_a_message_comes_whole_in_bounded_chunks(big_log):
    stub, admin, data = big_log
    chunks = list(stub.StreamLogs(js.StreamLogsRequest(name="jobs/chatty"), metadata=admin, timeout=DEADLINE))
    assert "".join(c.text for c in chunks).encode() == data
    assert len(chunks) > 1 and all(len(c.text.encode()) <= LOG_READ_BYTES + 4 for c in chunks)
    assert chunks[-1].next_offset == len(data)
    assert chunks[0].next_offset == LOG_READ_BYTES - 1  # é is held back, sent whole with the next chunk

    # Going on from a chunk's next_offset gives exactly the rest.
    middle = chunks[len(chunks) // 2].next_offset
    rest = stub.StreamLogs(js.StreamLogsRequest(name="jobs/chatty", offset=middle), metadata=admin, timeout=DEADLINE)
    assert "".join(c.text for c in rest).encode() == data[middle:]


def test_a_log_tail_in_lines_or_bytes(big_log):
    stub, admin, data = big_log

    def read(**fields) -> bytes:
        request = js.StreamLogsRequest(name="jobs/chatty", **fields)
        return "".join(c.text for c in stub.StreamLogs(request, metadata=admin, timeout=DEADLINE)).encode()

    assert read(tail_lines=3) == b"".join(data.splitlines(keepends=True)[-3:])
    assert read(tail_lines=100_000) == b"".join(data.splitlines(keepends=True)[-100_000:])
    assert read(tail_bytes=10) == data[-10:]
    with pytest.raises(grpc.RpcError) as refused:
        read(tail_lines=3, offset=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in refused.value.details()
    with pytest.raises(grpc.RpcError) as negative:
        read(tail_bytes=-1)
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tail_bytes" in negative.value.details()
