"""The controller runtime: the keyed work queue, workers that never work one key twice at once, and a job
controller whose slow launcher stop holds up no other job and whose ended attempts wake only the waiting jobs
that can use the ranks they freed."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from orchestrator.controller import (ControllerRuntime, JobController, ReconcilerSettings, WorkQueue, job_controller,
                                     waiting_writer)
from orchestrator.controller.waiting_writer import WAITING_FOR_RANKS, WaitingNote, WaitingWriter
from orchestrator.launcher import AttemptStatus, Phase
from orchestrator.store import Database, Job, JobState, migrate
from orchestrator.store.models import utcnow

from tests.integration.test_reconciler import SETTINGS, FakeLauncher, add_job, job
from tests.support.waiting import DEADLINE, wait_until


def test_a_key_is_queued_once_and_one_being_worked_is_queued_again_after():
    queue = WorkQueue()
    queue.add("a")
    queue.add("a")
    queue.add("b")
    assert queue.get() == "a"
    queue.add("a")  # changed while a worker has it: not handed to another worker now...
    assert queue.get() == "b"
    queue.done("b")
    assert len(queue) == 1
    queue.done("a")  # ...but queued again once the first is done
    assert queue.get() == "a"


def test_a_delayed_key_comes_when_due():
    queue = WorkQueue()
    began = time.monotonic()
    queue.add_after("later", 0.2)
    queue.add("now")
    assert queue.get() == "now"
    assert queue.get() == "later" and time.monotonic() - began >= 0.2
    queue.shut_down()
    assert queue.get() is None


def test_workers_never_reconcile_one_key_at_once_and_see_the_last_notification():
    inside: dict[str, int] = {}
    most_at_once = 0
    passes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def reconcile(key: str):
        nonlocal most_at_once
        with lock:
            inside[key] = inside.get(key, 0) + 1
            most_at_once = max(most_at_once, inside[key])
            passes.append((key, time.monotonic()))
        time.sleep(0.01)
        with lock:
            inside[key] -= 1
        return None

    runtime = ControllerRuntime("test", reconcile, lambda: [], workers=4, resync_seconds=60)
    runtime.start()
    try:
        for _ in range(50):
            for key in ("x", "y"):
                runtime.notify(key)
            time.sleep(0.002)
        last_notify = time.monotonic()
        runtime.notify("x")
        wait_until(lambda: any(k == "x" and t >= last_notify for k, t in passes),
                   "a pass after the last notify")
    finally:
        runtime.stop()
    assert most_at_once == 1
    assert {k for k, _ in passes} == {"x", "y"}


class SlowStopLauncher(FakeLauncher):
    """A launcher whose stop takes 30 s (a slow cluster API), however the caller meant it."""

    def __init__(self):
        super().__init__()
        self.stop_entered = threading.Event()
        self.release = threading.Event()
        self.launch_times: dict[str, float] = {}

    def launch(self, request):
        self.launch_times[request.job] = time.monotonic()
        return super().launch(request)

    def stop(self, ref, grace_seconds):
        super().stop(ref, grace_seconds)
        self.stop_entered.set()
        self.release.wait(DEADLINE)  # a stop that lasts until the test releases it: "30 s" or longer


def test_a_stop_that_takes_30_s_delays_no_other_jobs_launch(db):
    interval = 0.2
    launcher = SlowStopLauncher()
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1",
                               ReconcilerSettings(interval_seconds=interval, resync_seconds=60), workers=4)
    controller.start()
    try:
        add_job(db, "first")
        controller.wake("first")
        wait_until(lambda: job(db, "first").state == JobState.RUNNING, "the first job runs")
        with db.session() as session:
            session.get(Job, "first").cancel_requested = True  # what CancelJob records
        controller.wake("first")
        assert launcher.stop_entered.wait(DEADLINE), "the cancel never reached the launcher"

        created = {}
        for name in ("second", "third", "fourth"):  # more jobs than the workers left free
            add_job(db, name)
            created[name] = time.monotonic()
            controller.wake(name)
        # The fact: each is launched while the first job's stop is still blocked in the launcher, which stays
        # blocked until released below, so no worker waits on it.
        wait_until(lambda: all(n in launcher.launch_times for n in created), "the other jobs launch")
        assert not launcher.release.is_set()
        assert job(db, "first").state == JobState.RUNNING  # cancelled only once its ranks are gone
    finally:
        launcher.release.set()
        controller.stop()
    assert job(db, "first").cancel_requested


# -- waking waiting jobs when ranks are freed ---------------------------------------------------------------


class PerJobLauncher(FakeLauncher):
    """FakeLauncher whose attempts succeed per job (the fake keys its statuses by attempt number alone)."""

    def __init__(self, max_ranks: int):
        super().__init__()
        self.max_ranks = max_ranks
        self.succeeded: set[str] = set()

    def status(self, ref):
        return AttemptStatus(Phase.SUCCEEDED) if ref.job in self.succeeded else super().status(ref)


def queued(controller: JobController) -> list[str]:
    """The keys in the controller's queue, in order, taken out of it (its workers are not started here)."""
    keys = []
    while len(controller.runtime.queue):
        key = controller.runtime.queue.get()
        controller.runtime.queue.done(key)
        keys.append(key)
    return keys


def drain(controller: JobController, keys: list[str]) -> dict[str, int]:
    """Works `keys` and whatever their passes queue (what the workers would do), one pass at a time, until
    nothing is queued; returns how many passes each job got."""
    passes: dict[str, int] = {}
    todo = list(keys)
    while todo:
        key = todo.pop(0)
        passes[key] = passes.get(key, 0) + 1
        if controller.reconcile(key) == 0:  # look again at once
            todo.append(key)
        todo += [k for k in queued(controller) if k not in todo]
        assert sum(passes.values()) < 1000, "the passes never settled"
    return passes


def start_running(controller: JobController, name: str) -> None:
    drain(controller, [name])
    assert job(controller.db, name).state == JobState.RUNNING, job(controller.db, name).state_message


def waiting(db: Database, name: str) -> bool:
    row = job(db, name)
    return row.state == JobState.QUEUED and row.state_reason == "WaitingForRanks"


def ranks_in_use(db: Database) -> int:
    with db.read() as session:
        return sum(row.current_attempt.world_size for row in session.query(Job)
                   if row.current_attempt is not None and row.current_attempt.state in ("PENDING", "RUNNING"))


def test_an_attempt_that_ends_wakes_as_many_waiting_jobs_as_can_use_its_ranks_oldest_first(db):
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "running")  # 8 ranks: all there are
    start_running(controller, "running")
    names = [f"w{i:02d}" for i in range(30)]  # each takes 8 ranks when it can, and starts with 2
    for name in names:
        add_job(db, name)
    drain(controller, names)
    assert all(waiting(db, name) for name in names)

    launcher.succeeded.add("running")
    passes = drain(controller, ["running"])
    # The fact: one job could use the 8 ranks freed, and only it got a pass (it had been 30, one per waiting
    # job, for every attempt that ended).
    assert job(db, "running").state == JobState.SUCCEEDED
    assert set(passes) == {"running", "w00"}
    assert job(db, "w00").state == JobState.RUNNING and job(db, "w00").current_attempt.world_size == 8
    assert all(waiting(db, name) for name in names[1:])
    assert ranks_in_use(db) == 8

    # And so on down the line, in the order they were created: none is passed over for a younger one of its size.
    launcher.succeeded.add("w00")
    passes = drain(controller, ["w00"])
    assert set(passes) == {"w00", "w01"} and job(db, "w01").state == JobState.RUNNING
    assert ranks_in_use(db) == 8


def test_ranks_too_few_for_the_oldest_waiting_job_go_to_a_younger_one_that_fits(db):
    launcher = PerJobLauncher(max_ranks=10)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "a")
    start_running(controller, "a")  # 8 ranks
    add_job(db, "b")
    start_running(controller, "b")  # the 2 left
    add_job(db, "big", resources={"min_ranks": 8})
    add_job(db, "small")  # starts with 2
    drain(controller, ["big", "small"])
    assert waiting(db, "big") and waiting(db, "small")

    launcher.succeeded.add("b")
    passes = drain(controller, ["b"])
    assert set(passes) == {"b", "small"}  # 2 ranks freed: "big" cannot use them, so it gets no pass
    assert job(db, "small").state == JobState.RUNNING and waiting(db, "big")
    assert ranks_in_use(db) == 10


def test_a_woken_job_whose_ranks_were_taken_meanwhile_passes_them_on(db):
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "a")
    start_running(controller, "a")
    add_job(db, "big", resources={"min_ranks": 8})
    add_job(db, "small")
    drain(controller, ["big", "small"])

    launcher.succeeded.add("a")
    controller.reconcile("a")
    assert queued(controller) == ["big"]  # the 8 ranks freed are big's
    add_job(db, "newcomer", parallelism={"tp": 2, "pp": 2, "dp": 1})  # 4 ranks, admitted before big's pass
    start_running(controller, "newcomer")
    controller.reconcile("big")  # 4 ranks left: big still waits, and the admission is made again
    assert waiting(db, "big") and queued(controller) == ["small"]
    drain(controller, ["small"])
    assert job(db, "small").state == JobState.RUNNING and job(db, "small").current_attempt.world_size == 4
    assert ranks_in_use(db) == 8


def add_too_big_job(db: Database, name: str) -> None:
    """A job that needs 16 ranks at least: more than the 8 these launchers have."""
    add_job(db, name, parallelism={"tp": 2, "pp": 2, "dp": 4}, resources={"min_ranks": 16},
            training={"global_batch_size": 16, "micro_batch_size": 2})


def test_an_admission_pass_reads_a_page_at_a_time_and_stops_once_no_ranks_are_left(db, monkeypatch):
    """With thousands waiting, every ended attempt's admission pass read them all: the server's memory grew
    with the queue. Now it reads a page at a time, down the line only as far as the free ranks go."""
    monkeypatch.setattr(job_controller, "ADMISSION_PAGE", 2)
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "running")
    start_running(controller, "running")
    too_big = [f"big{i}" for i in range(5)]
    small = [f"s{i}" for i in range(6)]  # each takes 8 ranks when it can, and starts with 2
    for name in too_big:
        add_too_big_job(db, name)
    for name in small:
        add_job(db, name)
    drain(controller, too_big + small)
    assert all(waiting(db, name) for name in too_big + small)
    assert len(controller._fewest) == 0  # no admission pass yet
    with db.session() as session:  # created at one instant (one group commit): in the line by name
        session.execute(update(Job).where(Job.name != "running").values(create_time=utcnow()))

    launcher.succeeded.add("running")
    controller.reconcile("running")
    # Three pages of two: five jobs passed over, and s0, which takes the 8 ranks freed; none read after it.
    assert queued(controller) == ["s0"]
    assert set(controller._fewest) == {job(db, name).uid for name in too_big + ["s0"]}
    drain(controller, ["s0"])
    assert job(db, "s0").state == JobState.RUNNING and ranks_in_use(db) == 8
    assert controller._woken == set()


def test_the_fewest_ranks_admission_remembers_are_bounded(db, monkeypatch):
    monkeypatch.setattr(job_controller, "ADMISSION_PAGE", 2)
    monkeypatch.setattr(job_controller, "FEWEST_CACHED", 3)
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    too_big = [f"big{i}" for i in range(7)]
    for name in too_big:
        add_too_big_job(db, name)
    add_job(db, "small")
    drain(controller, too_big + ["small"])  # small starts at once: 8 ranks
    assert job(db, "small").state == JobState.RUNNING

    launcher.succeeded.add("small")
    controller.reconcile("small")  # 8 ranks freed, and no waiting job can use them
    assert queued(controller) == []
    assert list(controller._fewest) == [job(db, name).uid for name in too_big[-3:]]  # the last ones read
    add_job(db, "another")
    assert controller._wake_admissible() == ["another"]  # the pass goes on as before, reading specs again


def test_a_woken_job_is_forgotten_by_its_own_pass_whatever_it_finds(db):
    """An admission pass reads the jobs before it takes the admission lock: a job admitted or ended in between
    is woken all the same. Its pass (the wake queued one) forgets it, whatever state it is in."""
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "a")
    start_running(controller, "a")
    add_job(db, "b")
    drain(controller, ["b"])
    launcher.succeeded.add("a")
    controller.reconcile("a")
    assert queued(controller) == ["b"] and controller._woken == {"b"}
    with db.session() as session:  # ended meanwhile, by whatever means
        session.get(Job, "b").state = JobState.FAILED
    assert controller.reconcile("b") is None
    assert controller._woken == set()


def test_a_wake_that_fails_after_an_attempt_ended_asks_for_a_resync(db, monkeypatch):
    """The attempt's end is committed before the wake: a retried pass would wake no one, so a resync does."""
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "a")
    start_running(controller, "a")

    def database_hiccup():
        raise OSError("the database went away")

    monkeypatch.setattr(controller, "_wake_admissible", database_hiccup)
    launcher.succeeded.add("a")
    controller.reconcile("a")
    assert job(db, "a").state == JobState.SUCCEEDED
    assert controller.runtime._resync_now.is_set()


def test_the_resync_passes_over_each_waiting_job_only_through_one_admission(db):
    """The periodic resync queued every unfinished job: with thousands waiting for ranks, thousands of passes
    that each found again that the job cannot start. Now it queues the others, and the waiting jobs that fit."""
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "running")
    start_running(controller, "running")
    names = [f"w{i:02d}" for i in range(20)]
    for name in names:
        add_job(db, name)
    drain(controller, names)
    add_job(db, "new")  # not looked at yet: the resync queues it
    with db.session() as session:
        session.get(Job, "w05").cancel_requested = True  # what CancelJob records: the resync queues it too

    assert controller._resync_keys() == ["running", "w05", "new"] and queued(controller) == []
    launcher.max_ranks = 10  # two more ranks (a job starts with 2): the oldest waiting job is woken
    assert controller._resync_keys() == ["running", "w05", "new"] and queued(controller) == ["w00"]


def test_a_job_whose_spec_no_longer_parses_stops_no_admission(db):
    launcher = PerJobLauncher(max_ranks=8)
    controller = JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)
    add_job(db, "broken")
    add_job(db, "fine")
    with db.session() as session:
        session.get(Job, "broken").spec = {"name": "broken", "no_such_section": 1}  # an older version's row
    assert controller._resync_keys() == ["broken", "fine"] and queued(controller) == ["fine"]


def test_a_waiting_note_that_failed_to_commit_is_written_once_the_database_answers(db, monkeypatch):
    """A job waiting for ranks may get no other pass for long: its note is tried again, not dropped, when the
    database did not answer (a PostgreSQL restarting)."""
    add_job(db, "waits")
    refusals = [OperationalError("INSERT ...", {}, Exception("the database system is shutting down"))]

    class RestartingDatabase:  # the first transaction fails, as during a restart
        def connection(self):
            if refusals:
                raise refusals.pop()
            return db.connection()

    monkeypatch.setattr(waiting_writer, "RETRY_SECONDS", 0.05)
    writer = WaitingWriter(RestartingDatabase())
    writer.start()
    try:
        writer.note(WaitingNote("waits", JobState.QUEUED.value, None, "waiting for 2 ranks", utcnow()))
        wait_until(lambda: job(db, "waits").state_reason == WAITING_FOR_RANKS, "the note is written")
    finally:
        writer.close()
    assert not refusals and job(db, "waits").state_message == "waiting for 2 ranks"
