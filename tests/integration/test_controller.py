"""The controller runtime: the keyed work queue, workers that never work one key twice at once, and a job
controller whose slow launcher stop holds up no other job."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.controller import ControllerRuntime, JobController, ReconcilerSettings, WorkQueue
from orchestrator.store import Database, Job, JobState, migrate

from tests.integration.test_reconciler import FakeLauncher, add_job, job
from tests.support.waiting import DEADLINE


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout:g} s")


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
        wait_until(lambda: any(k == "x" and t >= last_notify for k, t in passes), DEADLINE,
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
        wait_until(lambda: job(db, "first").state == JobState.RUNNING, DEADLINE, "the first job runs")
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
        wait_until(lambda: all(n in launcher.launch_times for n in created), DEADLINE, "the other jobs launch")
        assert not launcher.release.is_set()
        assert job(db, "first").state == JobState.RUNNING  # cancelled only once its ranks are gone
    finally:
        launcher.release.set()
        controller.stop()
    assert job(db, "first").cancel_requested
