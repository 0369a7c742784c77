"""roundhouse.v1.TrainerService: what ranks call. Ranks never touch the database; this is their only way in.

Each call must carry the credential of the attempt it names. Every answer tells a rank whether to stop:
a rank of an attempt that is no longer current (or of a cancelled job) is told to exit."""

from __future__ import annotations

import hmac

import grpc

from orchestrator.api import convert
from orchestrator.auth import bearer_token, job_token
from orchestrator.store import Database, Job, JobState, Metric, RankStatus, utcnow
from roundhouse.v1 import trainer_service_pb2, trainer_service_pb2_grpc


class TrainerService(trainer_service_pb2_grpc.TrainerServiceServicer):
    def __init__(self, db: Database, credential_key: bytes):
        self.db = db
        self.credential_key = credential_key

    def Heartbeat(self, request, context):
        with self.db.session() as session:
            job = self._authorized_job(session, request.job, request.attempt, context)
            row = session.get(RankStatus, (job.name, request.attempt, request.rank))
            if row is None:
                row = RankStatus(job_name=job.name, attempt=request.attempt, rank=request.rank)
                session.add(row)
            row.step = request.step
            row.last_heartbeat = utcnow()
            stop, reason = _should_stop(job, request.attempt)
        return trainer_service_pb2.HeartbeatResponse(stop=stop, stop_reason=reason)

    def ReportMetrics(self, request, context):
        with self.db.session() as session:
            job = self._authorized_job(session, request.job, request.attempt, context)
            stop, reason = _should_stop(job, request.attempt)
            if not stop:
                for point in request.points:
                    session.add(Metric(
                        job_name=job.name, attempt=request.attempt, rank=request.rank, step=point.step,
                        loss=point.loss if point.HasField("loss") else None,
                        val_loss=point.val_loss if point.HasField("val_loss") else None,
                        tokens_per_second=point.tokens_per_second, memory_bytes=point.memory_bytes,
                        learning_rate=point.learning_rate,
                        time=point.time.ToDatetime() if point.HasField("time") else utcnow()))
                trained = [p for p in request.points if p.HasField("loss")]
                if trained:
                    newest = max(trained, key=lambda p: p.step)
                    job.current_step = newest.step
                    job.last_loss = newest.loss
                    job.tokens_per_second = newest.tokens_per_second
                    job.update_time = utcnow()
        return trainer_service_pb2.ReportMetricsResponse(stop=stop, stop_reason=reason)

    def _authorized_job(self, session, name: str, attempt: int, context) -> Job:
        job_id = convert.job_id_from_name(name)
        job = session.get(Job, job_id) if job_id else None
        token = bearer_token(context.invocation_metadata())
        # One answer for "no such job" and "wrong credential": a rank's token proves which job it is.
        if job is None or token is None or not hmac.compare_digest(token, job_token(self.credential_key, job.uid, attempt)):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the credential does not match this job and attempt")
        return job


def _should_stop(job: Job, attempt: int) -> tuple[bool, str]:
    if job.cancel_requested:
        return True, "the job was cancelled"
    if JobState(job.state).terminal:
        return True, f"the job has ended ({job.state})"
    current = job.current_attempt
    if current is None or current.number != attempt:
        return True, f"attempt {attempt} is not the job's current attempt"
    return False, ""

