"""What a failed attempt costs, and when a rank counts as hung: pure functions over a job's rows.

A failure spends one of three budgets: a preemption (the ranks checkpointed and exited, or a pod was taken
away) `restart_policy.max_preemptions`; a hang (a rank's heartbeats stopped for `hang_timeout_seconds`)
`max_hang_restarts`; anything else `max_restarts`. A failure another attempt would only repeat (an image
that cannot be pulled) fails the job at once. The restart backoff doubles with each attempt in a row that
ended without committing a new checkpoint, and resets once one commits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from contract.spec import JobSpec
from orchestrator.launcher import PREEMPTED
from orchestrator.store import Attempt, Job, JobState, utcnow

HUNG = "Hung"
MAX_RANKS_NAMED = 5  # in a hang's message


@dataclass(frozen=True)
class Decision:
    """What a failure does to the job: RESTARTING after `backoff_seconds` (with `counter` incremented), or
    FAILED. `message` is the job's state message."""

    state: JobState
    message: str
    counter: str | None = None  # the Job column counting the budget's use
    backoff_seconds: float = 0.0


@dataclass(frozen=True)
class _Budget:
    counter: str  # the Job column that counts its use
    limit: int
    noun: str  # for messages: "preemption 1 of 10"


def decide(job: Job, spec: JobSpec, reason: str, message: str, retryable: bool, backoff_base: float,
           backoff_max: float) -> Decision:
    """Restart if the failure's own budget has room (and another attempt could fare better), else fail."""
    if not retryable:
        return Decision(JobState.FAILED, f"{message}; not retried: another attempt would fail the same way")
    budget = _budget_for(job, spec, reason)
    used = getattr(job, budget.counter)
    if used >= budget.limit:
        spent = f"{budget.noun} budget of {budget.limit} spent" if budget.limit else f"no {budget.noun}s allowed"
        return Decision(JobState.FAILED, f"{message}; {spent}")
    backoff = min(backoff_base * 2 ** max(0, failures_without_progress(job) - 1), backoff_max)
    return Decision(JobState.RESTARTING,
                    f"{message}; {budget.noun} {used + 1} of {budget.limit}, next attempt in {backoff:.0f} s",
                    budget.counter, backoff)


def failures_without_progress(job: Job) -> int:
    """How many attempts in a row, newest first, ended without committing a new checkpoint. An attempt made
    progress if the job's newest checkpoint (for the current attempt) or the next attempt's start step is past
    the step it started from."""
    count, reached = 0, job.checkpoint_step
    for attempt in reversed(job.attempts):
        if reached > attempt.start_step:
            break
        count += 1
        reached = attempt.start_step
    return count


def _budget_for(job: Job, spec: JobSpec, reason: str) -> _Budget:
    """A preemption is the cluster's doing and a hang is nobody's for sure: neither spends the crash budget."""
    policy = spec.restart_policy
    if reason == PREEMPTED:
        return _Budget("preemption_count", policy.max_preemptions, "preemption")
    if reason == HUNG:
        return _Budget("hang_restart_count", policy.max_hang_restarts, "hang restart")
    return _Budget("restart_count", job.max_restarts, "restart")


def hang_message(attempt: Attempt, beats: dict[int, tuple[datetime, int]], total_steps: int, timeout: float,
                 slow_phase_timeout: float) -> str:
    """Names the ranks that went silent, or "" if none did: a rank whose last heartbeat (rank -> (time,
    step)) is older than `timeout`, or than `slow_phase_timeout` if it had trained the final step, or one
    that sent none in the `slow_phase_timeout` since the attempt started."""
    now = utcnow()
    started = attempt.start_time or attempt.create_time
    silent = []
    for rank in range(attempt.world_size):
        last, step = beats.get(rank, (None, 0))
        quiet = (now - (last or started)).total_seconds()
        if last is None:
            if quiet > slow_phase_timeout:
                silent.append(f"rank {rank} (no heartbeat in the {quiet:.0f} s since the attempt started)")
        elif quiet > (slow_phase_timeout if step >= total_steps else timeout):
            silent.append(f"rank {rank} (last heartbeat {quiet:.0f} s ago, at step {step})")
    if not silent:
        return ""
    named = ", ".join(silent[:MAX_RANKS_NAMED]) + (f" and {len(silent) - MAX_RANKS_NAMED} more"
                                                   if len(silent) > MAX_RANKS_NAMED else "")
    return f"hung: {named}; restart_policy.hang_timeout_seconds is {timeout:g}"
