"""Group commit of "waiting for ranks" notes: the hot write of the job controller when thousands of jobs wait
(each job's first pass finds no room and says so once).

A note is a status write and its event, applied in one statement pair that is a no-op if the job moved on
or was already told the same thing, so it may be applied late or twice. No external action follows it, so
the pass that made it does not wait: the writer thread commits every note queued meanwhile in one
transaction, one fsync for all (as CreateJob's rows are, orchestrator/store/job_writer.py). A note lost in a
crash is made again by the next control plane's first pass. Without a started writer (tests that drive
passes themselves) a note is committed at once."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, or_, update

from orchestrator.store import Database, Event, Job

log = logging.getLogger(__name__)

MAX_BATCH = 512
# A batch that fails (the database not answering) is tried again this often, this many times.
RETRY_SECONDS = 1.0
MAX_TRIES = 30
WAITING_FOR_RANKS = "WaitingForRanks"


@dataclass(frozen=True)
class WaitingNote:
    job: str
    state: str  # the state the pass saw (QUEUED or RESTARTING): the note applies only if it still holds
    attempt: int | None
    message: str
    time: datetime


class WaitingWriter:
    def __init__(self, db: Database):
        self._db = db
        self._queue: queue.SimpleQueue[WaitingNote | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="waiting-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Commits what is queued, then stops."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def note(self, note: WaitingNote) -> None:
        if self._thread is None:
            self._commit([note])
        else:
            self._queue.put(note)

    def _run(self) -> None:
        while (note := self._queue.get()) is not None:
            batch = [note]
            while len(batch) < MAX_BATCH:
                try:
                    note = self._queue.get_nowait()
                except queue.Empty:
                    break
                if note is None:
                    self._queue.put(None)  # commit this batch first, then stop
                    break
                batch.append(note)
            self._commit_until_done(batch)

    def _commit_until_done(self, batch: list[WaitingNote]) -> None:
        """Commits the batch, trying again while the database does not answer (a PostgreSQL restarting): a job
        waiting for ranks may get no other pass for a long time, and until its note is written it looks as if
        no pass had seen it. After MAX_TRIES the notes are dropped; the jobs' next passes make them again."""
        for tries in range(1, MAX_TRIES + 1):
            try:
                self._commit(batch)
                return
            except Exception:
                if tries == MAX_TRIES:
                    log.exception("writing %d waiting notes failed %d times; the jobs' next passes make them again",
                                  len(batch), tries)
                    return
                log.warning("writing %d waiting notes failed; trying again in %g s", len(batch), RETRY_SECONDS,
                            exc_info=True)
                time.sleep(RETRY_SECONDS)

    def _commit(self, notes: list[WaitingNote]) -> None:
        with self._db.connection() as conn:  # Core: one transaction for the batch
            for note in notes:
                told = conn.execute(update(Job).where(
                    Job.name == note.job, Job.state == note.state, Job.cancel_requested.is_(False),
                    or_(Job.state_reason != WAITING_FOR_RANKS, Job.state_message != note.message))
                    .values(state_reason=WAITING_FOR_RANKS, state_message=note.message, update_time=note.time))
                if told.rowcount:
                    conn.execute(insert(Event).values(
                        job_name=note.job, attempt=note.attempt, type="Waiting", reason=WAITING_FOR_RANKS,
                        message=note.message, create_time=note.time))
