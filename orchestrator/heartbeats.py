"""Ranks' heartbeats, kept in memory and written to the database as periodic summaries.

Every rank heartbeats about once a second; a durable write for each would make heartbeats the database's
hottest writer. The TrainerService records them here; a thread writes the ones that arrived since its last
pass to `rank_status` every `summary_seconds`, all in one transaction. Readers in this process (the job
controller's hang check) see the newest heartbeat at once through `beats`, which overlays what is pending
on what the database holds; readers elsewhere (the dashboard, a control plane started after a crash) see
the summary, at most `summary_seconds` old. A crash loses at most that much, which the hang check allows
for: it judges hangs only once its own process has been up for a job's hang timeout."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from orchestrator.store import Database, RankStatus, utcnow

log = logging.getLogger(__name__)

SUMMARY_SECONDS = 5.0


@dataclass(frozen=True)
class Beat:
    step: int
    phase: str
    time: datetime


class Heartbeats:
    def __init__(self, db: Database, summary_seconds: float = SUMMARY_SECONDS):
        self.db = db
        self.summary_seconds = summary_seconds
        self._lock = threading.Lock()
        # (job name, attempt, rank) -> its newest heartbeat not yet written. Bounded by the ranks that run.
        self._pending: dict[tuple[str, int, int], Beat] = {}
        # What a flush is writing: still read from here until its transaction has committed.
        self._flushing: dict[tuple[str, int, int], Beat] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, job: str, attempt: int, rank: int, step: int, phase: str) -> None:
        with self._lock:
            self._pending[(job, attempt, rank)] = Beat(step, phase, utcnow())

    def beats(self, job: str, attempt: int) -> dict[int, tuple[datetime, int]]:
        """rank -> (time, step) of the newest heartbeat of each rank of the attempt that sent one."""
        # Memory first, then the database: a flush that commits in between is then in one or the other.
        with self._lock:
            in_memory = [(key[2], beat) for beats in (self._flushing, self._pending) for key, beat in beats.items()
                         if key[:2] == (job, attempt)]
        with self.db.read() as session:
            out = {rank: (last, step) for rank, last, step in session.execute(
                select(RankStatus.rank, RankStatus.last_heartbeat, RankStatus.step)
                .where(RankStatus.job_name == job, RankStatus.attempt == attempt))}
        for rank, beat in in_memory:
            if rank not in out or beat.time >= out[rank][0]:
                out[rank] = (beat.time, beat.step)
        return out

    def flush(self) -> None:
        """Writes the heartbeats received since the last flush, in one transaction."""
        with self._lock:
            pending = self._flushing = self._pending
            self._pending = {}
        if not pending:
            return
        try:
            with self.db.session() as session:
                for (job, attempt, rank), beat in pending.items():
                    row = session.get(RankStatus, (job, attempt, rank))
                    if row is None:
                        row = RankStatus(job_name=job, attempt=attempt, rank=rank)
                        session.add(row)
                    row.step, row.phase, row.last_heartbeat = beat.step, beat.phase, beat.time
        except Exception:  # a summary is not worth stopping for: the next heartbeats come within seconds
            log.exception("writing %d heartbeats failed", len(pending))
        finally:
            with self._lock:
                self._flushing = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stopped.wait(self.summary_seconds):
            self.flush()
