"""Group commit for job creation: concurrent CreateJob calls share one transaction, so one fsync makes a
whole batch durable, and each batch is three multi-row INSERTs rather than an ORM flush per job.

A caller blocks until the transaction holding its job has committed (or learns that the name is taken)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select

from orchestrator.store.models import Event, Job, JobLabel

MAX_BATCH = 256
# Built once: a statement built per batch (an IN over a list of literals above all) cost more CPU than the
# batch's INSERTs (benchmarks/create_job_ceiling.py measures this path).
_NAMES_TAKEN = select(Job.name).where(Job.name.in_(bindparam("names", expanding=True)))
_INSERT_JOBS = Job.__table__.insert()
_INSERT_LABELS = JobLabel.__table__.insert()
_INSERT_EVENTS = Event.__table__.insert()


class NameTaken(Exception):
    pass


@dataclass
class NewJob:
    job: dict[str, Any]  # column values of the jobs row
    labels: dict[str, str] = field(default_factory=dict)
    event: dict[str, Any] = field(default_factory=dict)  # column values of its "Created" event

    @property
    def name(self) -> str:
        return self.job["name"]


class JobWriter:
    def __init__(self, db):
        self._db = db
        self._queue: queue.SimpleQueue[tuple[NewJob, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="job-writer", daemon=True)
        self._thread.start()

    def create(self, new_job: NewJob) -> None:
        """Returns once the job is committed; raises NameTaken if a job of that name exists."""
        future: Future = Future()
        self._queue.put((new_job, future))
        future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # commit this batch first, then stop
                    break
                batch.append(item)
            try:
                self._commit(batch)
            except Exception:
                # Something in the batch broke the transaction (a concurrent writer on another replica
                # took a name, say): fall back to one transaction per job so only that job fails.
                for one in batch:
                    try:
                        self._commit([one])
                    except Exception as exc:
                        one[1].set_exception(exc)

    def _commit(self, batch: list[tuple[NewJob, Future]]) -> None:
        accepted: list[tuple[NewJob, Future]] = []
        rejected: list[Future] = []
        with self._db.connection() as conn:  # Core, not the ORM: this is the hot path of CreateJob
            names = [new.name for new, _ in batch]
            taken = set(conn.scalars(_NAMES_TAKEN, {"names": names}))
            for new, future in batch:
                if new.name in taken:
                    rejected.append(future)
                else:
                    taken.add(new.name)  # the first of two same-named jobs in one batch wins
                    accepted.append((new, future))
            if accepted:
                conn.execute(_INSERT_JOBS, [new.job for new, _ in accepted])
                labels = [{"job_name": new.name, "key": k, "value": v} for new, _ in accepted
                          for k, v in new.labels.items()]
                if labels:
                    conn.execute(_INSERT_LABELS, labels)
                conn.execute(_INSERT_EVENTS, [new.event for new, _ in accepted])
        for _, future in accepted:
            future.set_result(None)
        for future in rejected:
            future.set_exception(NameTaken())
