"""TrainerService over real gRPC on both databases: what rank 0 tells about checkpoints becomes rows, the
job's checkpoint step and events; a report counts only while its attempt has not ended, from a rank within its
world, and a refusal writes nothing and waits for no lock. Heartbeats are kept in memory and summarized.
ReportMetrics: µP's σ_max values are stored with their point, bounded per point, and a point over the bound is
refused."""

from __future__ import annotations

import math

import grpc
import pytest
from sqlalchemy import select

from orchestrator.auth import job_token, rank_credential_key
from contract.metrics import MAX_PARAMETER_NAME, MAX_SIGMA_PARAMETERS
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import Attempt, AttemptState, Checkpoint, Event, Job, Metric, RankStatus
from roundhouse.v1 import job_pb2, job_service_pb2 as js, trainer_service_pb2 as ts, trainer_service_pb2_grpc
from tests.support.waiting import DEADLINE

COMMITTED = ts.CHECKPOINT_EVENT_COMMITTED
RESTORED = ts.CHECKPOINT_EVENT_RESTORED
REJECTED = ts.CHECKPOINT_EVENT_REJECTED
REMOVED = ts.CHECKPOINT_EVENT_REMOVED
LAYOUT_222 = job_pb2.Layout(tp=2, pp=2, dp=2)


class Ranks:
    """A job with attempts 1 (tp=2 pp=2 dp=2, failed) and 2 (tp=2 pp=2 dp=1, current), and rank 0's stub."""

    def __init__(self, client, plane):
        spec = parse_spec({"name": "ckpt", "parallelism": {"tp": 2, "pp": 2, "dp": 2},
                           "training": {"global_batch_size": 8, "micro_batch_size": 2},
                           "resources": {"min_ranks": 4}})
        self.client, self.plane = client, plane
        self.uid = client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=client.metadata).uid
        with plane.db.session() as session:
            job = session.get(Job, "ckpt")
            job.attempts.append(Attempt(job_name="ckpt", number=1, state=AttemptState.FAILED, tp=2, pp=2, dp=2,
                                        world_size=8))
            job.attempts.append(Attempt(job_name="ckpt", number=2, state=AttemptState.RUNNING, tp=2, pp=2, dp=1,
                                        world_size=4))
        self.key = rank_credential_key(plane.db)
        self.stub = trainer_service_pb2_grpc.TrainerServiceStub(client.channel)

    def report(self, event: int, step: int, attempt: int = 2, layout: job_pb2.Layout = LAYOUT_222,
               token: str | None = None, **fields) -> ts.ReportCheckpointResponse:
        token = token or job_token(self.key, self.uid, attempt)
        request = ts.ReportCheckpointRequest(job="jobs/ckpt", attempt=attempt, rank=0, event=event, step=step,
                                             layout=layout, **fields)
        return self.stub.ReportCheckpoint(request, metadata=[("authorization", f"Bearer {token}")])

    def report_metrics(self, *points: job_pb2.MetricPoint, attempt: int = 2) -> ts.ReportMetricsResponse:
        token = job_token(self.key, self.uid, attempt)
        request = ts.ReportMetricsRequest(job="jobs/ckpt", attempt=attempt, rank=0, points=points)
        return self.stub.ReportMetrics(request, metadata=[("authorization", f"Bearer {token}")])

    def metrics(self) -> list[Metric]:
        with self.plane.db.read() as session:
            return session.scalars(select(Metric).order_by(Metric.id)).all()

    def job(self) -> job_pb2.Job:
        return self.client.jobs.GetJob(js.GetJobRequest(name="jobs/ckpt"), metadata=self.client.metadata)

    def checkpoints(self) -> list[tuple[int, int, int, int, int, str, int]]:
        with self.plane.db.read() as session:
            rows = session.scalars(select(Checkpoint).order_by(Checkpoint.step))
            return [(c.step, c.attempt, c.tp, c.pp, c.dp, c.path, c.size_bytes) for c in rows]

    def events(self, reason: str) -> list[Event]:
        with self.plane.db.read() as session:
            return session.scalars(select(Event).where(Event.reason == reason).order_by(Event.id)).all()


@pytest.fixture
def ranks(client, api_plane) -> Ranks:
    return Ranks(client, api_plane)


def test_committed_records_the_checkpoint_once_and_moves_the_checkpoint_step(ranks):
    answer = ranks.report(COMMITTED, 10, path="/ck/step-10", size_bytes=1234)
    ranks.report(COMMITTED, 10, path="/ck/step-10", size_bytes=1234)  # a retry: nothing changes
    assert answer.stop is False
    assert ranks.checkpoints() == [(10, 2, 2, 2, 2, "/ck/step-10", 1234)]
    assert ranks.job().checkpoint_step == 10

    ranks.report(COMMITTED, 20, path="/ck/step-20")
    ranks.report(COMMITTED, 15, path="/ck/step-15")  # late, out of order: recorded, never lowers the step
    assert [c[0] for c in ranks.checkpoints()] == [10, 15, 20]
    assert ranks.job().checkpoint_step == 20


def test_an_ended_attempts_reports_are_refused_and_write_nothing(ranks):
    """Attempt 1 ended (its ranks are gone): its credential no longer counts, for any call."""
    with pytest.raises(grpc.RpcError) as info:
        ranks.report(COMMITTED, 999, attempt=1, path="/anywhere")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "attempt 1 of jobs/ckpt has ended (FAILED)" in info.value.details()
    metadata = [("authorization", f"Bearer {job_token(ranks.key, ranks.uid, 1)}")]
    with pytest.raises(grpc.RpcError) as beat:
        ranks.stub.Heartbeat(ts.HeartbeatRequest(job="jobs/ckpt", attempt=1, rank=0, step=5), metadata=metadata)
    assert beat.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as metrics:
        ranks.stub.ReportMetrics(ts.ReportMetricsRequest(job="jobs/ckpt", attempt=1, rank=0,
                                                         points=[job_pb2.MetricPoint(step=5, loss=1.0)]),
                                 metadata=metadata)
    assert metrics.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    ranks.plane.heartbeats.flush()
    assert ranks.checkpoints() == [] and ranks.job().checkpoint_step == 0 and ranks.job().current_step == 0
    with ranks.plane.db.read() as session:
        assert session.scalars(select(RankStatus).where(RankStatus.job_name == "ckpt")).all() == []


def test_once_the_job_has_ended_its_current_attempts_reports_are_refused(ranks):
    with ranks.plane.db.session() as session:
        session.get(Job, "ckpt").current_attempt.state = AttemptState.SUCCEEDED
    with pytest.raises(grpc.RpcError) as info:
        ranks.report(COMMITTED, 10, path="/ck/step-10")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ranks.checkpoints() == []


def test_a_rank_outside_the_attempts_world_is_invalid_argument(ranks):
    """Attempt 2 has 4 ranks: its credential vouches for ranks 0 to 3 only."""
    metadata = [("authorization", f"Bearer {job_token(ranks.key, ranks.uid, 2)}")]
    for rank in (4, -1):
        with pytest.raises(grpc.RpcError) as info:
            ranks.stub.Heartbeat(ts.HeartbeatRequest(job="jobs/ckpt", attempt=2, rank=rank, step=1), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rank" in info.value.details()
    ranks.stub.Heartbeat(ts.HeartbeatRequest(job="jobs/ckpt", attempt=2, rank=3, step=1), metadata=metadata)


def test_a_refused_call_takes_no_write_lock(ranks):
    """While another transaction holds the write lock (SQLite) or the job's row (PostgreSQL), a call with a
    wrong credential or none is still refused at once: refusing only reads."""
    with ranks.plane.db.session() as session:
        session.get(Job, "ckpt", with_for_update=True)
        for token in ("not-the-token", None):
            metadata = [("authorization", f"Bearer {token}")] if token else []
            request = ts.ReportCheckpointRequest(job="jobs/ckpt", attempt=2, rank=0, event=COMMITTED, step=10,
                                                 layout=LAYOUT_222)
            with pytest.raises(grpc.RpcError) as info:
                ranks.stub.ReportCheckpoint(request, metadata=metadata, timeout=DEADLINE)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as ended:  # an ended attempt's report too
            ranks.report(COMMITTED, 10, attempt=1)
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_stopping_attempts_commit_is_recorded(ranks):
    """A rank that checkpoints on SIGTERM reports while its attempt stops: the attempt has not ended yet."""
    with ranks.plane.db.session() as session:
        job = session.get(Job, "ckpt")
        job.current_attempt.stop_deadline = job.current_attempt.create_time
        job.cancel_requested = True
    answer = ranks.report(COMMITTED, 30, path="/ck/step-30")
    assert answer.stop is True and "cancelled" in answer.stop_reason
    assert ranks.checkpoints() == [(30, 2, 2, 2, 2, "/ck/step-30", 0)]
    assert ranks.job().checkpoint_step == 30


def test_restored_sets_the_attempts_start_step_and_says_it_reshaped(ranks):
    ranks.report(RESTORED, 10)
    ranks.report(RESTORED, 10)  # a retry logs nothing new
    job = ranks.job()
    assert [a.start_step for a in job.attempts] == [0, 10]
    [event] = ranks.events("CheckpointRestored")
    assert event.type == "Checkpoint" and event.attempt == 2
    assert event.message == ("attempt 2 resumed from the checkpoint at step 10, written at tp=2 pp=2 dp=2, "
                             "reshaped to tp=2 pp=2 dp=1")


def test_restored_at_the_same_layout_is_not_called_reshaped(ranks):
    ranks.report(RESTORED, 10, layout=job_pb2.Layout(tp=2, pp=2, dp=1))
    [event] = ranks.events("CheckpointRestored")
    assert event.message.endswith("written and loaded at tp=2 pp=2 dp=1")


def test_rejected_forgets_the_checkpoint_and_falls_back_to_the_newest_left(ranks):
    ranks.report(COMMITTED, 10, path="/ck/step-10")
    ranks.report(COMMITTED, 20, path="/ck/step-20")
    ranks.report(REJECTED, 20, path="/ck/step-20", message="shard 3: sha256 mismatch")
    assert [c[0] for c in ranks.checkpoints()] == [10]
    assert ranks.job().checkpoint_step == 10
    [event] = ranks.events("CheckpointCorrupt")
    assert event.message == "checkpoint at step 20 failed its checks and was skipped: shard 3: sha256 mismatch"

    ranks.report(REJECTED, 10, message="manifest unreadable")
    assert ranks.checkpoints() == [] and ranks.job().checkpoint_step == 0


def test_removed_deletes_the_row_without_lowering_the_step_below_newer_ones(ranks):
    for step in (10, 20, 30):
        ranks.report(COMMITTED, step, path=f"/ck/step-{step}")
    ranks.report(REMOVED, 10)
    ranks.report(REMOVED, 10)  # twice: still fine
    assert [c[0] for c in ranks.checkpoints()] == [20, 30]
    assert ranks.job().checkpoint_step == 30
    ranks.report(REMOVED, 30)
    assert ranks.job().checkpoint_step == 20
    assert ranks.events("CheckpointCorrupt") == []


def test_a_wrong_credential_is_unauthenticated_and_writes_nothing(ranks):
    with pytest.raises(grpc.RpcError) as info:
        ranks.report(COMMITTED, 10, token="not-the-token")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:  # attempt 1's credential does not vouch for attempt 2
        ranks.report(COMMITTED, 10, attempt=2, token=job_token(ranks.key, ranks.uid, 1))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ranks.checkpoints() == []


@pytest.mark.parametrize(("fields", "bad"), [
    ({"event": ts.CHECKPOINT_EVENT_UNSPECIFIED, "step": 10}, "event"),
    ({"event": COMMITTED, "step": -1}, "step"),
    ({"event": COMMITTED, "step": 10, "layout": job_pb2.Layout(tp=2, pp=0, dp=1)}, "layout.pp"),
    ({"event": COMMITTED, "step": 10, "size_bytes": -5}, "size_bytes"),
])
def test_a_malformed_report_is_invalid_argument_and_writes_nothing(ranks, fields, bad):
    with pytest.raises(grpc.RpcError) as info:
        ranks.report(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad in info.value.details()
    assert ranks.checkpoints() == [] and ranks.job().checkpoint_step == 0


def test_list_checkpoints_pages_through_the_kept_ones_newest_first(ranks):
    for step in (10, 20, 30, 40, 50):
        ranks.report(COMMITTED, step, path=f"/ck/step-{step}", size_bytes=step * 1000)
    ranks.report(REMOVED, 20)

    def page(token: str = "", size: int = 2) -> js.ListCheckpointsResponse:
        return ranks.client.jobs.ListCheckpoints(js.ListCheckpointsRequest(parent="jobs/ckpt", page_size=size,
                                                                           page_token=token),
                                                 metadata=ranks.client.metadata)

    first = page()
    second = page(first.next_page_token)
    assert [[c.step for c in p.checkpoints] for p in (first, second)] == [[50, 40], [30, 10]]
    assert first.next_page_token and not second.next_page_token  # no third page
    newest = first.checkpoints[0]
    assert (newest.path, newest.size_bytes, newest.attempt) == ("/ck/step-50", 50_000, 2)
    assert (newest.layout.tp, newest.layout.pp, newest.layout.dp) == (2, 2, 2)

    with pytest.raises(grpc.RpcError) as refused:
        page(first.next_page_token, size=3)  # a token is for the page size it came with
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in refused.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        ranks.client.jobs.ListCheckpoints(js.ListCheckpointsRequest(parent="jobs/nope"),
                                          metadata=ranks.client.metadata)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_heartbeat_records_what_the_rank_is_doing_cut_to_its_bound(ranks):
    """A rank sitting at step 0 says why (loading DeepSpeed's op, joining its peers); the dashboard shows it."""
    token = job_token(ranks.key, ranks.uid, 2)
    metadata = [("authorization", f"Bearer {token}")]
    phase = "building DeepSpeed's CPU comm op (once per venv)"
    ranks.stub.Heartbeat(ts.HeartbeatRequest(job="jobs/ckpt", attempt=2, rank=1, step=0, phase=phase),
                         metadata=metadata)
    ranks.stub.Heartbeat(ts.HeartbeatRequest(job="jobs/ckpt", attempt=2, rank=0, step=0, phase="x" * 1000),
                         metadata=metadata)
    ranks.plane.heartbeats.flush()  # what the periodic summary writes
    with ranks.plane.db.read() as session:
        rows = session.scalars(select(RankStatus).where(RankStatus.job_name == "ckpt")).all()
        phases = {row.rank: row.phase for row in rows}
    assert phases == {0: "x" * 64, 1: phase}


def test_heartbeats_stay_in_memory_until_the_summary_and_the_hang_check_sees_them_at_once(ranks):
    metadata = [("authorization", f"Bearer {job_token(ranks.key, ranks.uid, 2)}")]
    ranks.stub.Heartbeat(ts.HeartbeatRequest(job="jobs/ckpt", attempt=2, rank=2, step=7), metadata=metadata)
    heartbeats = ranks.plane.heartbeats
    assert heartbeats is ranks.plane.job_controller.heartbeats
    with ranks.plane.db.read() as session:  # not yet written: a heartbeat is no durable write
        assert session.scalars(select(RankStatus).where(RankStatus.job_name == "ckpt")).all() == []
    [(rank, (when, step))] = heartbeats.beats("ckpt", 2).items()
    assert (rank, step) == (2, 7)
    heartbeats.flush()
    with ranks.plane.db.read() as session:
        row = session.get(RankStatus, ("ckpt", 2, 2))
        assert (row.step, row.last_heartbeat) == (7, when)
    assert heartbeats.beats("ckpt", 2) == {2: (when, 7)}  # now from the database


# -- metrics: µP's σ_max -------------------------------------------------------------------------------------

def test_sigma_max_is_stored_with_its_point_and_read_back_as_sent(ranks):
    from orchestrator.api.convert import metric_to_proto

    sigma = {"blocks.0.attn.qkv.weight": 1.5, "blocks.0.mlp.fc.weight": 2.25, "head.out.weight": math.nan}
    ranks.report_metrics(job_pb2.MetricPoint(step=49, loss=3.0),
                         job_pb2.MetricPoint(step=50, loss=2.9, sigma_max=sigma))
    plain, carrying = ranks.metrics()
    assert plain.sigma_max is None
    # A value that is not finite (diverged weights) is kept as null, which JSON holds on every database.
    assert carrying.sigma_max == {"blocks.0.attn.qkv.weight": 1.5, "blocks.0.mlp.fc.weight": 2.25,
                                  "head.out.weight": None}
    assert ranks.job().current_step == 50
    back = dict(metric_to_proto(carrying).sigma_max)
    assert back["blocks.0.attn.qkv.weight"] == 1.5 and math.isnan(back["head.out.weight"])
    assert len(metric_to_proto(plain).sigma_max) == 0


@pytest.mark.parametrize(("sigma", "why"), [
    ({f"blocks.{i}.attn.qkv.weight": 1.0 for i in range(MAX_SIGMA_PARAMETERS + 1)}, "at most 64 parameters"),
    ({"x" * (MAX_PARAMETER_NAME + 1): 1.0}, "a parameter name must have 1 to 64 characters"),
    ({"": 1.0}, "a parameter name must have 1 to 64 characters"),
])
def test_a_point_over_the_sigma_max_bounds_is_invalid_argument_and_nothing_is_written(ranks, sigma, why):
    with pytest.raises(grpc.RpcError) as info:
        ranks.report_metrics(job_pb2.MetricPoint(step=1, loss=3.0),
                             job_pb2.MetricPoint(step=2, loss=2.9, sigma_max=sigma))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "points[1].sigma_max" in info.value.details() and why in info.value.details()
    assert ranks.metrics() == [] and ranks.job().current_step == 0
