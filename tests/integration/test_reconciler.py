"""The job controller's passes over a fake launcher (no processes) on both databases: layouts fitted to the
ranks available, waiting for ranks, separate restart budgets for crashes, preemptions and hangs, hang
detection, stops as a durable phase. The tests call `reconcile` themselves (no worker threads)."""

from __future__ import annotations

import re
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from orchestrator.launcher import AttemptRef, AttemptStatus, LaunchRequest, Phase
from orchestrator.controller import JobController, ReconcilerSettings
from contract.spec import parse_spec
from orchestrator.store import AttemptState, Database, Event, Job, JobState, RankStatus, migrate, utcnow

RUNNING = AttemptStatus(Phase.RUNNING)
SETTINGS = ReconcilerSettings(restart_backoff_seconds=0, stop_grace_seconds=10, failed_stop_grace_seconds=1,
                              hang_start_end_grace_seconds=30)


class FakeLauncher:
    """The Launcher protocol in memory: every launch 'runs' until a test sets another status."""

    def __init__(self):
        self.max_ranks: int | None = None
        self.launched: list[LaunchRequest] = []
        self.status_of: dict[int, AttemptStatus] = {}  # by attempt number
        self.stops: list[tuple[int, float]] = []  # (attempt, grace)
        self.running: set[int] = set()  # attempts whose ranks still run after a stop (none unless a test says)

    def subscribe(self, notify) -> None:
        pass

    def capacity(self) -> int | None:
        return self.max_ranks

    def launch(self, request: LaunchRequest) -> dict:
        self.launched.append(request)
        self.status_of.setdefault(request.attempt, RUNNING)
        return {"fake": request.attempt}

    def status(self, ref: AttemptRef) -> AttemptStatus:
        return self.status_of.get(ref.attempt, AttemptStatus(Phase.PENDING))

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        self.stops.append((ref.attempt, grace_seconds))

    def ranks_gone(self, ref: AttemptRef) -> bool:
        return ref.attempt not in self.running

    def logs(self, ref, rank, follow, attempt_ended):
        return iter(())


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def reconciler(db, launcher) -> JobController:
    return JobController(db, launcher, b"k" * 32, "127.0.0.1:1", SETTINGS)


def add_job(db: Database, name: str = "j", **sections) -> None:
    """A tp=2 pp=2 dp=2 job that accepts down to 2 ranks."""
    spec = parse_spec({"name": name, "parallelism": {"tp": 2, "pp": 2, "dp": 2},
                       "training": {"global_batch_size": 8, "micro_batch_size": 2},
                       "resources": {"min_ranks": 2}, **sections})
    with db.session() as session:
        session.add(Job(name=name, uid=str(uuid.uuid4()), spec=spec.model_dump(mode="json", exclude_none=True),
                        state=JobState.QUEUED, total_steps=spec.training.steps,
                        max_restarts=spec.restart_policy.max_restarts, attempts=[], labels=[]))


def job(db: Database, name: str = "j") -> Job:
    with db.read() as session:
        return session.get(Job, name)


def events(db: Database, reason: str) -> list[Event]:
    with db.read() as session:
        return session.scalars(select(Event).where(Event.reason == reason).order_by(Event.id)).all()


def settle(reconciler: JobController, name: str = "j") -> None:
    """Passes while the controller asks to look again at once (what its workers would do), at most 10."""
    for _ in range(10):
        if reconciler.reconcile(name) != 0:
            return
    raise AssertionError("the job never settled")


def run_attempt(reconciler: JobController, db: Database, name: str = "j") -> Job:
    """Passes until the current attempt is launched and the job RUNNING."""
    settle(reconciler, name)
    assert job(db, name).state == JobState.RUNNING, job(db, name).state_message
    return job(db, name)


def end_current(reconciler: JobController, db: Database, name: str = "j") -> Job:
    """Passes until the current attempt has ended (a failure's stop takes a pass or two)."""
    for _ in range(10):
        reconciler.reconcile(name)
        if AttemptState(job(db, name).current_attempt.state).terminal:
            return job(db, name)
    raise AssertionError("the attempt never ended")


def fail_current(reconciler: JobController, launcher: FakeLauncher, db: Database, reason: str, message: str) -> Job:
    launcher.status_of[job(db).current_attempt.number] = AttemptStatus(Phase.FAILED, reason, message)
    return end_current(reconciler, db)


def test_crashes_preemptions_and_hangs_spend_separate_budgets(db, launcher, reconciler):
    add_job(db, restart_policy={"max_restarts": 1, "max_preemptions": 2, "max_hang_restarts": 0})
    run_attempt(reconciler, db)

    after = fail_current(reconciler, launcher, db, "Preempted", "rank 0 was preempted (exit code 4)")
    assert after.state == JobState.RESTARTING and after.state_reason == "Preempted"
    assert after.state_message.endswith("preemption 1 of 2, next attempt in 0 s")
    assert (after.preemption_count, after.restart_count, after.hang_restart_count) == (1, 0, 0)
    assert launcher.stops[-1] == (1, 10)  # preempted ranks leave by themselves: the full grace

    run_attempt(reconciler, db)
    after = fail_current(reconciler, launcher, db, "RankFailed", "rank 1 exited with code 17")
    assert after.state == JobState.RESTARTING and "restart 1 of 1" in after.state_message
    assert (after.preemption_count, after.restart_count) == (1, 1)
    assert launcher.stops[-1] == (2, 1)  # a half-dead gang gets the failed-gang grace

    run_attempt(reconciler, db)
    after = fail_current(reconciler, launcher, db, "Preempted", "rank 3 was preempted (exit code 4)")
    assert after.state == JobState.RESTARTING and "preemption 2 of 2" in after.state_message

    run_attempt(reconciler, db)
    after = fail_current(reconciler, launcher, db, "RankFailed", "rank 0 exited with code 1")
    assert after.state == JobState.FAILED
    assert after.state_message == "rank 0 exited with code 1; restart budget of 1 spent"
    assert len(after.attempts) == 4


def test_the_restart_backoff_doubles_while_attempts_fail_without_progress_and_resets_after_a_checkpoint(db, launcher):
    reconciler = JobController(db, launcher, b"k" * 32, "127.0.0.1:1",
                               ReconcilerSettings(restart_backoff_seconds=10, restart_backoff_max_seconds=60))
    add_job(db, restart_policy={"max_restarts": 10})

    def fail_and_get_backoff(checkpoint_step: int | None = None) -> str:
        run_attempt(reconciler, db)
        if checkpoint_step is not None:
            with db.session() as session:
                session.get(Job, "j").checkpoint_step = checkpoint_step  # what ReportCheckpoint(COMMITTED) records
        after = fail_current(reconciler, launcher, db, "RankFailed", "rank 1 exited with code 17")
        with db.session() as session:  # skip the wait: the test reads the message, not the clock
            session.get(Job, "j").next_attempt_time = utcnow()
        return after.state_message.rsplit(", ", 1)[1]

    assert fail_and_get_backoff() == "next attempt in 10 s"
    assert fail_and_get_backoff() == "next attempt in 20 s"
    assert fail_and_get_backoff() == "next attempt in 40 s"
    assert fail_and_get_backoff() == "next attempt in 60 s"  # the cap
    assert fail_and_get_backoff(checkpoint_step=30) == "next attempt in 10 s"  # it committed step 30: reset
    assert fail_and_get_backoff() == "next attempt in 10 s"  # the first failure in a row from step 30
    assert fail_and_get_backoff() == "next attempt in 20 s"
    assert [a.start_step for a in job(db).attempts] == [0, 0, 0, 0, 0, 30, 30]


def test_a_hang_with_no_hang_restarts_fails_the_job(db, launcher, reconciler):
    add_job(db, restart_policy={"max_restarts": 5, "hang_timeout_seconds": 5})
    run_attempt(reconciler, db)
    reconciler.started_at = time.monotonic() - 3600
    with db.session() as session:
        session.add(RankStatus(job_name="j", attempt=1, rank=0, last_heartbeat=utcnow() - timedelta(seconds=30)))
        for rank in range(1, 8):
            session.add(RankStatus(job_name="j", attempt=1, rank=rank, last_heartbeat=utcnow()))
    after = end_current(reconciler, db)
    assert after.state == JobState.FAILED and after.state_reason == "Hung"
    assert after.restart_count == 0 and after.state_message.endswith("no hang restarts allowed")
    assert "rank 0 (last heartbeat 30 s ago, at step 0)" in after.state_message


def set_attempt_start(db: Database, seconds_ago: float) -> None:
    with db.session() as session:
        session.get(Job, "j").current_attempt.start_time = utcnow() - timedelta(seconds=seconds_ago)


def test_a_silent_rank_is_a_hang_only_after_the_timeout_and_this_control_plane_was_up_that_long(
        db, launcher, reconciler):
    add_job(db, restart_policy={"max_hang_restarts": 1, "hang_timeout_seconds": 5})
    run_attempt(reconciler, db)
    set_attempt_start(db, 90)
    with db.session() as session:  # ranks 0-6 beat now, rank 7 never did
        for rank in range(7):
            session.add(RankStatus(job_name="j", attempt=1, rank=rank, last_heartbeat=utcnow()))

    reconciler.reconcile("j")  # this control plane just started: heartbeats may not have reached it yet
    assert job(db).state == JobState.RUNNING and launcher.stops == []

    reconciler.started_at = time.monotonic() - 10
    after = end_current(reconciler, db)
    assert after.state == JobState.RESTARTING and after.state_reason == "Hung"
    assert after.hang_restart_count == 1 and after.restart_count == 0
    silent = re.search(r"rank 7 \(no heartbeat in the (\d+) s since the attempt started\)", after.state_message)
    assert silent and int(silent.group(1)) >= 90  # at least the 90 s since the start; more on a slow machine
    assert "hang restart 1 of 1" in after.state_message
    assert launcher.stops == [(1, 1)]
    assert after.attempts[0].state == "FAILED"


def test_a_restart_with_fewer_ranks_reshapes_and_resumes_from_the_newest_checkpoint(db, launcher, reconciler):
    add_job(db, restart_policy={"max_preemptions": 3})
    run_attempt(reconciler, db)
    first = launcher.launched[-1]
    assert (first.tp, first.pp, first.dp, first.start_step) == (2, 2, 2, 0)
    with db.session() as session:
        session.get(Job, "j").checkpoint_step = 40  # what ReportCheckpoint(COMMITTED) records

    launcher.max_ranks = 5  # nodes lost
    fail_current(reconciler, launcher, db, "Preempted", "rank 0 was preempted (exit code 4)")
    after = run_attempt(reconciler, db)
    second = launcher.launched[-1]
    assert (second.tp, second.pp, second.dp, second.start_step) == (2, 2, 1, 40)
    p = second.spec.parallelism
    assert (p.tp, p.pp, p.dp, second.spec.resources.ranks, second.spec.resources.min_ranks) == (2, 2, 1, 4, 2)
    attempt = after.attempts[-1]
    assert (attempt.tp, attempt.pp, attempt.dp, attempt.world_size, attempt.start_step) == (2, 2, 1, 4, 40)
    created = events(db, "AttemptCreated")[-1].message
    assert created.startswith("attempt 2: tp=2 pp=2 dp=1, 4 ranks, from step 40 (the newest committed checkpoint); "
                              "5 of 8 ranks available")
    [reshaped] = events(db, "Reshaped")
    assert reshaped.attempt == 2 and "keeps tp=2 and pp=2" in reshaped.message

    launcher.max_ranks = None  # the nodes are back: the next restart grows to the job's own layout
    fail_current(reconciler, launcher, db, "Preempted", "rank 0 was preempted (exit code 4)")
    run_attempt(reconciler, db)
    third = launcher.launched[-1]
    assert (third.tp, third.pp, third.dp) == (2, 2, 2) and len(events(db, "Reshaped")) == 1


def test_a_reshape_where_the_model_fits_only_offloaded_switches_offload_on_and_says_why(db, launcher, reconciler):
    # About 6.9 B parameters in bf16: 32Gi per rank holds them at (2,2,2), at (2,2,1) only offloaded.
    big = {"layers": 32, "hidden_size": 4096, "heads": 32, "seq_length": 2048, "vocab_size": 50304}
    add_job(db, model=big, training={"precision": "bf16", "global_batch_size": 8, "micro_batch_size": 1},
            resources={"min_ranks": 4, "accelerator_memory": "32Gi"}, restart_policy={"max_preemptions": 3})
    run_attempt(reconciler, db)
    assert launcher.launched[-1].spec.training.offload.mode == "none" and events(db, "OptimizerStateOffloaded") == []

    launcher.max_ranks = 4
    fail_current(reconciler, launcher, db, "Preempted", "rank 0 was preempted (exit code 4)")
    run_attempt(reconciler, db)
    second = launcher.launched[-1]
    assert (second.tp, second.pp, second.dp) == (2, 2, 1)
    assert second.spec.training.offload.mode == "interleaved"
    [offloaded] = events(db, "OptimizerStateOffloaded")
    assert offloaded.attempt == 2 and offloaded.type == "Planned"
    assert "fits resources.accelerator_memory=32Gi only with its optimizer state offloaded" in offloaded.message


def test_the_capacity_is_shared_by_jobs_a_second_job_gets_what_the_first_leaves(db, launcher, reconciler):
    launcher.max_ranks = 12
    add_job(db, "a")
    run_attempt(reconciler, db, "a")
    add_job(db, "b")
    run_attempt(reconciler, db, "b")
    assert [(r.job, r.world_size) for r in launcher.launched] == [("a", 8), ("b", 4)]  # 12 - 8 left
    created_b = [e.message for e in events(db, "AttemptCreated") if e.job_name == "b"]
    assert len(created_b) == 1 and "4 of 8 ranks available" in created_b[0]

    add_job(db, "c")  # nothing left: it waits until a job ends
    reconciler.reconcile("c")
    assert job(db, "c").state == JobState.QUEUED and job(db, "c").state_reason == "WaitingForRanks"
    launcher.status_of[1] = AttemptStatus(Phase.SUCCEEDED)  # attempt 1 of both a and b: the fake keys by number
    settle(reconciler, "a")
    settle(reconciler, "b")
    assert job(db, "a").state == JobState.SUCCEEDED
    del launcher.status_of[1]  # c's attempt 1 runs
    run_attempt(reconciler, db, "c")
    assert (launcher.launched[-1].job, launcher.launched[-1].world_size) == ("c", 8)


def test_too_few_ranks_waits_and_says_so_once_then_starts_when_they_are_back(db, launcher, reconciler):
    add_job(db)
    launcher.max_ranks = 1  # min_ranks is 2
    for _ in range(3):
        reconciler.reconcile("j")
    waiting = job(db)
    assert waiting.state == JobState.QUEUED and waiting.state_reason == "WaitingForRanks"
    assert waiting.state_message == "1 of 8 ranks available; the job needs at least 2 (resources.min_ranks)"
    assert len(events(db, "WaitingForRanks")) == 1 and launcher.launched == []

    launcher.max_ranks = 2
    run_attempt(reconciler, db)
    assert (launcher.launched[-1].tp, launcher.launched[-1].pp, launcher.launched[-1].dp) == (2, 1, 1)


def test_a_restart_that_finds_too_few_ranks_waits_in_restarting(db, launcher, reconciler):
    add_job(db, restart_policy={"max_preemptions": 1})
    run_attempt(reconciler, db)
    launcher.max_ranks = 0
    fail_current(reconciler, launcher, db, "Preempted", "rank 0 was preempted (exit code 4)")
    reconciler.reconcile("j")
    waiting = job(db)
    assert waiting.state == JobState.RESTARTING and waiting.state_reason == "WaitingForRanks"
    assert len(waiting.attempts) == 1
    launcher.max_ranks = 8
    assert len(run_attempt(reconciler, db).attempts) == 2


def test_a_rank_still_starting_gets_the_startup_grace_not_the_hang_timeout(db, launcher, reconciler):
    add_job(db, restart_policy={"max_hang_restarts": 1, "hang_timeout_seconds": 5})
    run_attempt(reconciler, db)
    reconciler.started_at = time.monotonic() - 3600
    set_attempt_start(db, 20)  # past the 5 s timeout, within the 30 s grace: no rank has beaten yet
    reconciler.reconcile("j")
    assert job(db).state == JobState.RUNNING and launcher.stops == []
    set_attempt_start(db, 40)
    end_current(reconciler, db)
    assert job(db).state_reason == "Hung" and "rank 0 (no heartbeat in the 40 s" in job(db).state_message


def test_a_rank_past_its_final_step_gets_the_grace_to_finish(db, launcher, reconciler):
    add_job(db, training={"steps": 10, "global_batch_size": 8, "micro_batch_size": 2},
            restart_policy={"max_hang_restarts": 1, "hang_timeout_seconds": 5})
    run_attempt(reconciler, db)
    reconciler.started_at = time.monotonic() - 3600
    with db.session() as session:  # every rank trained step 10 of 10 and is writing its last checkpoint
        for rank in range(8):
            session.add(RankStatus(job_name="j", attempt=1, rank=rank, step=10,
                                   last_heartbeat=utcnow() - timedelta(seconds=20)))
    reconciler.reconcile("j")
    assert job(db).state == JobState.RUNNING
    with db.session() as session:
        session.get(RankStatus, ("j", 1, 5)).last_heartbeat = utcnow() - timedelta(seconds=40)
    end_current(reconciler, db)
    assert job(db).state_reason == "Hung" and "rank 5 (last heartbeat 40 s ago, at step 10)" in job(db).state_message


def test_a_failure_that_is_not_retryable_fails_the_job_at_once_with_budget_left(db, launcher, reconciler):
    add_job(db, restart_policy={"max_restarts": 3})
    run_attempt(reconciler, db)
    launcher.status_of[1] = AttemptStatus(Phase.FAILED, "ImagePullFailed",
                                          "rank 0 cannot pull image registry.example/trainer:missing",
                                          retryable=False)
    after = end_current(reconciler, db)
    assert after.state == JobState.FAILED and after.state_reason == "ImagePullFailed"
    assert "registry.example/trainer:missing" in after.state_message and "not retried" in after.state_message
    assert after.restart_count == 0 and len(after.attempts) == 1
    assert launcher.stops[-1] == (1, 1)  # the rest of the gang is stopped all the same


def test_a_cancel_signals_the_ranks_kills_them_after_the_grace_and_ends_the_job_once_they_are_gone(
        db, launcher, reconciler):
    add_job(db)
    run_attempt(reconciler, db)
    launcher.running.add(1)  # the ranks take their time to leave
    with db.session() as session:
        session.get(Job, "j").cancel_requested = True
    assert reconciler.reconcile("j") == 0
    assert launcher.stops == [(1, 10)]  # SIGTERM with the grace; the pass did not wait
    stopping = job(db)
    attempt = stopping.current_attempt
    assert stopping.state == JobState.RUNNING and attempt.state == "RUNNING" and attempt.stopping
    assert attempt.stop_outcome == "CANCELLED" and 9 < (attempt.stop_deadline - utcnow()).total_seconds() <= 10
    assert "told to stop (10 s grace)" in events(db, "StoppingRanks")[0].message

    assert 0 < reconciler.reconcile("j") <= SETTINGS.interval_seconds  # within the grace: look again later
    assert launcher.stops == [(1, 10)]
    with db.session() as session:  # the grace is over
        session.get(Job, "j").current_attempt.stop_deadline = utcnow() - timedelta(seconds=1)
    reconciler.reconcile("j")
    assert launcher.stops == [(1, 10), (1, 0)]  # what is left is killed
    assert job(db).state == JobState.RUNNING

    launcher.running.clear()
    reconciler.reconcile("j")
    after = job(db)
    assert after.state == JobState.CANCELLED and after.current_attempt.state == "CANCELLED"
    assert after.current_attempt.end_reason == "cancelled by user"


def test_a_restart_waits_for_the_old_gang_to_be_gone_and_its_ranks_stay_taken_meanwhile(db, launcher, reconciler):
    launcher.max_ranks = 8
    add_job(db, restart_policy={"max_preemptions": 1})
    run_attempt(reconciler, db)
    launcher.running.add(1)
    launcher.status_of[1] = AttemptStatus(Phase.FAILED, "Preempted", "rank 0 was preempted (exit code 4)")
    reconciler.reconcile("j")
    assert job(db).state == JobState.RESTARTING and job(db).preemption_count == 1
    for _ in range(3):
        reconciler.reconcile("j")
    assert len(job(db).attempts) == 1, "a new attempt started while the old ranks ran"

    add_job(db, "other")
    reconciler.reconcile("other")
    assert job(db, "other").state_reason == "WaitingForRanks"
    assert job(db, "other").state_message.startswith("0 of 8 ranks available")

    launcher.running.clear()
    del launcher.status_of[1]
    after = run_attempt(reconciler, db)
    assert [a.state for a in after.attempts] == ["FAILED", "RUNNING"]


def test_a_job_whose_ranks_all_exited_0_keeps_the_step_they_reported(db, launcher, reconciler):
    """An exit code says nothing of how far the ranks trained: the job's step is what they reported."""
    add_job(db)
    run_attempt(reconciler, db)
    with db.session() as session:
        session.get(Job, "j").current_step = 3  # rank 0's last ReportMetrics
    launcher.status_of[1] = AttemptStatus(Phase.SUCCEEDED)
    settle(reconciler)
    done = job(db)
    assert done.state == JobState.SUCCEEDED and done.current_step == 3
    [completed] = events(db, "Completed")
    assert completed.message == f"trained 3 of {done.total_steps} steps"
