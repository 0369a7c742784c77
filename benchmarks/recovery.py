"""Recovery from a rank's death, through the real control plane (issue 4).

A control plane runs in this process (SQLite in a temporary home, the local launcher, the reconciler); jobs
run as real rank processes (`python -m trainers`, gloo, dp=2) with checkpoints in the job's directory.
Failures are SIGKILL of one rank's trainer process, picked at random.

1. Recovery time: from the kill to the first step completed by the next attempt, split into
     detection         kill -> the attempt's failure recorded (the job goes RESTARTING; includes stopping the
                       surviving ranks, at most ReconcilerSettings.failed_stop_grace_seconds)
     restart backoff   -> the next attempt recorded ("AttemptCreated"); the configured backoff is printed
                       beside it (--backoff; it doubles only for attempts that failed before committing a
                       checkpoint, and every kill here falls after one)
     launch            -> its ranks started ("RanksStarted")
     process start-up  -> the start of the checkpoint restore (interpreter, imports, rendezvous, building the
                       engine), i.e. restore end minus the restore's own duration
     checkpoint load   the restore: checksums + load (rank 0's "checkpoint restored ... in T s" line)
     first step        restore end -> the first metric point of the new attempt (its own time stamp)
   The restore's end is when the "checkpoint restored" line appears in rank 0's log (polled every 10 ms);
   the other times come from the control plane's events and metric points. Goal: the part that is neither
   process start-up nor checkpoint loading is < 20 % of the total.
2. Goodput: (seconds spent in the steps of the final trajectory: steps later redone are not counted; a step's
   seconds are tokens per step / its tokens_per_second) / (wall time from CreateJob to the job's Completed
   event), for a job of about --minutes with a failure every --failure-every seconds, against the same job
   without failures (the baseline, run first).

    python -m benchmarks.recovery [--parts ab] [--kills 3] [--minutes 6] [--failure-every 120]

A smoke run (about 4 minutes), in one line:
    python -m benchmarks.recovery --kills 1 --minutes 1 --failure-every 30
        --layers 2 --hidden 64 --heads 4 --seq 64 --batch 4

A job that has not finished after max(3 x --minutes, --minutes + 5 min) is cancelled and reported. The
control plane's restart backoff doubles with every attempt in a row that ends without committing a
checkpoint and resets once one does (ReconcilerSettings), so --failure-every must leave an attempt time to
reach its next checkpoint (--interval steps) or the job stalls at the backoff's cap.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


import grpc
from sqlalchemy import select

from orchestrator.config import token_file
from orchestrator.controller import ReconcilerSettings
from orchestrator.server import ControlPlane, ServerSettings
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import Event, Metric
from roundhouse.v1 import job_pb2, job_service_pb2 as js, job_service_pb2_grpc
from trainers.checkpoint import committed_steps

RESTORED = re.compile(r"checkpoint restored: step (\d+) \(.*?\) written at .* in ([\d.]+) s \(checksums ([\d.]+) s, "
                      r"load ([\d.]+) s\)")
STEP = re.compile(r"^step (\d+)/\d+ loss ", re.M)
TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
PROBLEMS: list[str] = []  # what the control plane did not provide, printed at the end


def problem(text: str) -> None:
    if text not in PROBLEMS:
        PROBLEMS.append(text)
        print(f"  [problem] {text}", flush=True)


def epoch(value: datetime) -> float:
    """The store's naive-UTC times as seconds since the epoch."""
    return value.replace(tzinfo=UTC).timestamp()


class Plane:
    """A control plane in this process, on free ports, with an admin client."""

    def __init__(self, home: Path, settings: ReconcilerSettings):
        self.home = home
        self.settings = settings
        self.control = ControlPlane(ServerSettings(home=home, db_url=None, grpc_port=0, http_port=0,
                                                   reconcile=True, reconciler=settings, max_ranks=16,
                                                   allow_test_hooks=True))  # RH_TEST_STEP_SLEEP
        self.control.start()
        self.channel = grpc.insecure_channel(self.control.grpc_address)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token_file(home).read_text().strip()}")]

    def submit(self, spec: dict) -> tuple[str, float]:
        submitted = time.time()
        self.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(parse_spec(spec))), metadata=self.metadata,
                            timeout=30)
        return spec["name"], submitted

    def get(self, name: str) -> job_pb2.Job:
        return self.jobs.GetJob(js.GetJobRequest(name=f"jobs/{name}"), metadata=self.metadata, timeout=30)

    def cancel(self, name: str) -> None:
        try:
            self.jobs.CancelJob(js.CancelJobRequest(name=f"jobs/{name}"), metadata=self.metadata, timeout=30)
        except grpc.RpcError:
            pass  # already ended

    def wait(self, name: str, predicate, timeout: float, poll: float = 0.2) -> job_pb2.Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(name)
            if predicate(job) or job.state in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: waited {timeout:.0f} s; {job_pb2.JobState.Name(job.state)} "
                                   f"{job.state_message}")
            time.sleep(poll)

    def events(self, name: str) -> list[Event]:
        with self.control.db.read() as session:
            return list(session.scalars(select(Event).where(Event.job_name == name).order_by(Event.id)))

    def metrics(self, name: str) -> list[Metric]:
        with self.control.db.read() as session:
            return list(session.scalars(select(Metric).where(Metric.job_name == name, Metric.rank == 0)
                                        .order_by(Metric.attempt, Metric.step)))

    def attempt_dir(self, name: str, attempt: int) -> Path:
        return self.home / "runs" / name / f"attempt-{attempt}"

    def check_checkpoint_step(self, name: str, on_disk: list[int]) -> None:
        """Job.checkpoint_step should reach the newest committed checkpoint on disk (ReportCheckpoint) within
        a moment of its commit; says so if it does not."""
        if not on_disk:
            return
        if not any(f.name == "checkpoint_step" for f in job_pb2.Job.DESCRIPTOR.fields):
            problem("the Job message has no checkpoint_step field")
            return
        deadline = time.monotonic() + 3.0
        while (seen := self.get(name).checkpoint_step) < on_disk[0]:
            if time.monotonic() > deadline:
                problem(f"Job.checkpoint_step was {seen} 3 s after step {on_disk[0]}'s checkpoint was committed on "
                        "disk (the ReportCheckpoint COMMITTED report not recorded?)")
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()
        self.control.stop()


def trainer_pids(name: str, attempt: int) -> dict[int, int]:
    """rank -> pid of the attempt's trainer processes (not their shell wrappers)."""
    job_marker, attempt_marker = f"ROUNDHOUSE_JOB=jobs/{name}".encode(), f"ROUNDHOUSE_ATTEMPT={attempt}".encode()
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if zombie or job_marker not in environ or attempt_marker not in environ:
            continue
        if b"-m" in cmdline and b"trainers" in cmdline:
            rank = next(int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK="))
            out[rank] = int(entry.name)
    return out


def leftover_pids(home: Path) -> list[int]:
    """Trainer processes still running under this benchmark's control-plane home (none if all went well)."""
    marker = f"ROUNDHOUSE_RUN_DIR={home}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def steps_in_log(path: Path) -> list[int]:
    try:
        return [int(m[1]) for m in STEP.finditer(path.read_text(errors="replace"))]
    except OSError:
        return []


def has_trained(log: Path) -> bool:
    """Whether rank 0 is training: a step line in the last 8 KiB of its log (it prints one every step)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            return b"\nstep " in f.read()
    except OSError:
        return False


def job_spec(args, name: str, steps: int) -> dict:
    return {
        "name": name,
        "model": {"layers": args.layers, "hidden_size": args.hidden, "heads": args.heads, "seq_length": args.seq},
        "parallelism": {"dp": args.dp},
        "training": {"steps": steps, "global_batch_size": args.batch, "micro_batch_size": args.micro_batch,
                     "learning_rate": 1e-3, "warmup_steps": 0, "seed": 3},
        "checkpoint": {"interval": args.interval, "keep_last": 2, "async_save": not args.sync_saves},
        "restart_policy": {"max_restarts": 1000},
        "env": {"RH_TEST_STEP_SLEEP": str(args.step_sleep)} if args.step_sleep else {},
    }


def backoff_before(settings: ReconcilerSettings) -> float:
    """The reconciler's wait before a restart whose failed attempt had committed a checkpoint (every kill
    here falls after one): the backoff's base, as it resets after progress."""
    return min(settings.restart_backoff_seconds, settings.restart_backoff_max_seconds)


def kill_a_rank(plane: Plane, name: str, attempt: int, chance: random.Random) -> tuple[int, int, float] | None:
    """SIGKILLs one random rank of the attempt; (rank, pid, when) or None if none is running."""
    pids = trainer_pids(name, attempt)
    if not pids:
        return None
    rank = chance.choice(sorted(pids))
    when = time.time()
    try:
        os.kill(pids[rank], signal.SIGKILL)
    except ProcessLookupError:
        return None
    return rank, pids[rank], when


def wait_running(plane: Plane, name: str, min_steps: int, timeout: float) -> tuple[job_pb2.Job, int] | None:
    """Waits until the job's newest attempt has trained `min_steps` steps and its ranks are up; returns
    (job, attempt) or None if the job ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = plane.get(name)
        if job.state in TERMINAL:
            return None
        if job.state == job_pb2.JOB_STATE_RUNNING and job.attempts:
            attempt = job.attempts[-1].number
            if len(steps_in_log(plane.attempt_dir(name, attempt) / "rank-0.log")) >= min_steps:
                return job, attempt
        time.sleep(0.1)
    raise TimeoutError(f"{name}: no attempt trained {min_steps} steps in {timeout:.0f} s")


@dataclass
class Recovery:
    killed_rank: int
    killed_at_step: int
    resumed_from: int | None
    phases: dict[str, float]  # name -> seconds (None-free)
    backoff: float
    total: float


def watch_restore(log: Path, deadline: float) -> tuple[float | None, re.Match | None, float | None]:
    """Polls rank 0's log of the new attempt: (time the restored line appeared, its match, time the first
    step line appeared)."""
    seen_restore, match, seen_step, position, text = None, None, None, 0, ""
    while time.time() < deadline:
        try:
            with open(log, "rb") as f:
                f.seek(position)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        now = time.time()
        if chunk:
            position += len(chunk)
            text += chunk.decode(errors="replace")
            if seen_restore is None and (m := RESTORED.search(text)):
                seen_restore, match = now, m
            if seen_step is None and STEP.search(text):
                seen_step = now
                if seen_restore is None and "from the start" in text:
                    return None, None, seen_step
            if seen_step is not None and seen_restore is not None:
                return seen_restore, match, seen_step
        time.sleep(0.01)
    return seen_restore, match, seen_step


def measure_recovery(plane: Plane, name: str, kill_number: int, chance: random.Random, args) -> Recovery | None:
    # Past this attempt's first commit, at a random step of the next interval.
    ready = wait_running(plane, name, min_steps=args.interval + chance.randint(1, args.interval), timeout=300)
    if ready is None:
        problem(f"{name} ended before kill {kill_number}: {plane.get(name).state_message}")
        return None
    job, attempt = ready
    on_disk = committed_steps(plane.home / "runs" / name / "checkpoints")
    plane.check_checkpoint_step(name, on_disk)
    if not on_disk:
        print(f"  kill {kill_number}: no checkpoint committed yet; the next attempt starts from step 0")
    killed = kill_a_rank(plane, name, attempt, chance)
    if killed is None:
        problem(f"kill {kill_number}: found no trainer process of attempt {attempt} to kill")
        return None
    rank, _, t_kill = killed
    at_step = max(steps_in_log(plane.attempt_dir(name, attempt) / "rank-0.log"), default=0)
    restored_at, match, first_step_seen = watch_restore(plane.attempt_dir(name, attempt + 1) / "rank-0.log",
                                                        t_kill + 300)
    try:
        plane.wait(name, lambda j: any(m.attempt == attempt + 1 for m in plane.metrics(name)), timeout=60, poll=0.1)
    except TimeoutError:
        pass  # reported below

    events = plane.events(name)
    job = plane.get(name)
    if job.state in TERMINAL and job.state != job_pb2.JOB_STATE_SUCCEEDED:
        problem(f"{name} ended {job_pb2.JobState.Name(job.state)} after kill {kill_number} instead of restarting: "
                f"{job.state_message}")
        return None

    def when(predicate) -> float | None:
        return next((epoch(e.create_time) for e in events if predicate(e)), None)

    t_detect = when(lambda e: e.attempt == attempt and e.to_state == "RESTARTING")
    t_created = when(lambda e: e.attempt == attempt + 1 and e.reason == "AttemptCreated")
    t_launched = when(lambda e: e.attempt == attempt + 1 and e.reason == "RanksStarted")
    t_restored_event = when(lambda e: e.attempt == attempt + 1 and e.reason == "CheckpointRestored")
    points = [m for m in plane.metrics(name) if m.attempt == attempt + 1]
    t_first = epoch(points[0].time) if points else first_step_seen
    for what, value in (("a RESTARTING transition for the killed attempt", t_detect),
                        ("an AttemptCreated event for the next attempt", t_created),
                        ("a RanksStarted event for the next attempt", t_launched)):
        if value is None:
            problem(f"kill {kill_number}: the control plane recorded no {what}")
    if not points:
        problem(f"kill {kill_number}: no metric point of attempt {attempt + 1} reached the control plane; "
                "used the first step line's appearance in the log")
    if match is None:
        if on_disk:
            problem(f"kill {kill_number}: attempt {attempt + 1} printed no 'checkpoint restored' line although "
                    f"step {on_disk[0]} was committed before the kill")
        restore_total = checksums = load = 0.0
        resumed_from = None
    else:
        resumed_from = int(match[1])
        restore_total, checksums, load = float(match[2]), float(match[3]), float(match[4])
        if t_restored_event is None:
            problem("no CheckpointRestored event (ReportCheckpoint RESTORED not recorded by the control plane)")
    if restored_at is None:  # no restore (no checkpoint yet): process start-up runs to the first step line
        restored_at = first_step_seen if first_step_seen is not None else t_first
    if None in (t_detect, t_created, t_launched, restored_at, t_first):
        return None
    restore_start = restored_at - restore_total
    phases = {
        "detection (incl. stopping the other ranks)": t_detect - t_kill,
        "restart backoff (+ next reconciler pass)": t_created - t_detect,
        "launch": t_launched - t_created,
        "process start-up": restore_start - t_launched,
        "checkpoint load: checksums": checksums,
        "checkpoint load: load": load,
        "first step": t_first - restored_at,
    }
    survivors = []
    for other in range(args.dp):
        if other != rank:
            try:
                code = (plane.attempt_dir(name, attempt) / f"rank-{other}.exit").read_text().strip()
            except OSError:  # the launcher killed its whole process group, wrapper included
                survivors.append(f"rank {other} SIGKILLed by the launcher (failed-gang stop grace)")
                continue
            survivors.append(f"rank {other} exited {code}" + (" (SIGTERM)" if code == "143" else ""))
    print(f"  kill {kill_number}: rank {rank} of attempt {attempt} at step {at_step}; attempt {attempt + 1} resumed "
          f"from {resumed_from if resumed_from is not None else 'nothing'}; first step after "
          f"{t_first - t_kill:.2f} s; the other ranks of attempt {attempt}: {', '.join(survivors)}", flush=True)
    return Recovery(rank, at_step, resumed_from, phases, backoff_before(plane.settings),
                    t_first - t_kill)


def part_a(plane: Plane, args, chance: random.Random) -> list[float]:
    """Returns per-step wall seconds seen in the job (to size part b's jobs), and start-up seconds."""
    name, submitted = plane.submit(job_spec(args, "recovery", steps=100_000))
    recoveries = []
    try:
        for k in range(1, args.kills + 1):
            r = measure_recovery(plane, name, k, chance, args)
            if r is not None:
                recoveries.append(r)
    finally:
        plane.cancel(name)
        plane.wait(name, lambda j: j.state in TERMINAL, timeout=120)
    metrics = plane.metrics(name)
    gaps = [epoch(b.time) - epoch(a.time) for a, b in zip(metrics, metrics[1:])
            if a.attempt == b.attempt and b.step == a.step + 1]
    first = [m for m in metrics if m.attempt == 1]
    startup = epoch(first[0].time) - submitted if first else 30.0
    step_wall = statistics.median(gaps) if gaps else 1.0

    s = plane.settings
    print()
    print(f"1. Recovery time, kill -9 of a random rank to the first step of the next attempt; "
          f"{len(recoveries)} kill(s), median; dp={args.dp}, checkpoint every {args.interval} steps "
          f"({'sync' if args.sync_saves else 'async'}); reconciler every {s.interval_seconds} s, restart backoff "
          f"{s.restart_backoff_seconds} s (reset after progress), failed-gang stop grace {s.failed_stop_grace_seconds} s")
    if not recoveries:
        print("   no recovery measured (see the problems below)")
        return [step_wall, startup]
    print()
    print("| phase | seconds | share of total |")
    print("|---|---:|---:|")
    total = statistics.median(r.total for r in recoveries)
    medians = {p: statistics.median(r.phases[p] for r in recoveries) for p in recoveries[0].phases}
    for phase, value in medians.items():
        print(f"| {phase} | {value:.3f} | {value / total:.1%} |")
    print(f"| total (kill -> first step done) | {total:.3f} | 100% |")
    backoffs = statistics.median(r.backoff for r in recoveries)
    print()
    startup_and_load = (medians["process start-up"] + medians["checkpoint load: checksums"]
                        + medians["checkpoint load: load"])
    rest = total - startup_and_load
    print(f"Neither process start-up nor checkpoint loading: {rest:.3f} s = {rest / total:.1%} of the total "
          f"(goal < 20%); of it, the configured restart backoff: {backoffs:.3f} s (median)")
    print("Per kill: " + "; ".join(
        f"step {r.killed_at_step} -> resumed from {r.resumed_from}, {r.total:.2f} s "
        f"({(r.total - r.phases['process start-up'] - r.phases['checkpoint load: checksums'] - r.phases['checkpoint load: load']) / r.total:.0%} other)"
        for r in recoveries))
    print(flush=True)
    return [step_wall, startup]


@dataclass
class Goodput:
    wall: float
    useful: float
    steps: int
    attempts: int
    kills: int
    steps_run: int
    estimated: int  # final-trajectory steps with no metric point (their time estimated)
    state: str
    to_first_step: float  # CreateJob -> the first step's metric point
    after_last_step: float  # the last step's metric point -> Completed (final save, the ranks' exit, noticing it)

    @property
    def goodput(self) -> float:
        return self.useful / self.wall if self.wall else float("nan")


def run_goodput_job(plane: Plane, args, name: str, steps: int, failure_every: float | None,
                    chance: random.Random) -> Goodput:
    spec = job_spec(args, name, steps)
    name, submitted = plane.submit(spec)
    kills = 0
    deadline = submitted + max(3 * args.minutes * 60, args.minutes * 60 + 300)
    try:
        # The next kill comes failure_every seconds after the previous one (or the submission), once the
        # newest attempt is training; one kill per attempt (the detection takes a moment).
        next_kill = submitted + failure_every if failure_every else math.inf
        killed_attempt = 0
        while True:
            job = plane.get(name)
            if job.state in TERMINAL:
                break
            if time.time() > deadline:
                problem(f"{name} had not finished after {deadline - submitted:.0f} s; cancelled")
                break
            attempt = job.attempts[-1].number if job.attempts else 0
            if (time.time() >= next_kill and job.state == job_pb2.JOB_STATE_RUNNING and attempt != killed_attempt
                    and has_trained(plane.attempt_dir(name, attempt) / "rank-0.log")):
                if kill_a_rank(plane, name, attempt, chance) is not None:
                    kills += 1
                    killed_attempt = attempt
                    next_kill = time.time() + failure_every
                    print(f"  {name}: killed a rank of attempt {attempt} at {time.time() - submitted:.0f} s",
                          flush=True)
            time.sleep(0.2)
    finally:
        job = plane.get(name)
        if job.state not in TERMINAL:
            plane.cancel(name)
            job = plane.wait(name, lambda j: j.state in TERMINAL, timeout=120)
    events = plane.events(name)
    done = next((epoch(e.create_time) for e in events if e.to_state == "SUCCEEDED"), None)
    if done is None:
        problem(f"{name} ended {job_pb2.JobState.Name(job.state)}, not SUCCEEDED: {job.state_message}")
        done = time.time()
    tokens_per_step = args.batch * args.seq
    final: dict[int, Metric] = {}
    run = 0
    points = plane.metrics(name)
    for m in points:  # ordered by attempt, then step: a later attempt's point replaces
        final[m.step] = m
        run += 1
    durations = {s: tokens_per_step / m.tokens_per_second for s, m in final.items() if m.tokens_per_second > 0}
    missing = [s for s in range(1, steps + 1) if s not in durations]
    typical = statistics.median(durations.values()) if durations else 0.0
    useful = sum(durations.get(s, 0.0) for s in range(1, steps + 1)) + typical * len(missing)
    first = epoch(points[0].time) - submitted if points else float("nan")
    last = done - epoch(final[steps].time) if steps in final else float("nan")
    return Goodput(done - submitted, useful, steps, len(job.attempts), kills, run, len(missing),
                   job_pb2.JobState.Name(job.state), first, last)


def part_b(plane: Plane, args, chance: random.Random, step_wall: float, startup: float) -> None:
    steps = max(args.interval + 1, round((args.minutes * 60 - startup) / step_wall))
    print(f"2. Goodput: jobs of {steps} steps (about {args.minutes} min without failures: {step_wall:.3f} s per "
          f"step, {startup:.1f} s to the first step), checkpoint every {args.interval} steps; "
          f"the baseline first, then a kill -9 of a random rank every {args.failure_every:g} s", flush=True)
    base = run_goodput_job(plane, args, "goodput-baseline", steps, None, chance)
    faults = run_goodput_job(plane, args, "goodput-failures", steps, args.failure_every, chance)
    print()
    print("| job | state | attempts | kills | wall s | seconds in useful steps | steps run (incl. redone) | "
          "goodput | vs baseline | submit -> step 1 s | last step -> Completed s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, g in (("no failures (baseline)", base), (f"kill every {args.failure_every:g} s", faults)):
        print(f"| {label} | {g.state.removeprefix('JOB_STATE_')} | {g.attempts} | {g.kills} | {g.wall:.1f} | "
              f"{g.useful:.1f} | {g.steps_run} | {g.goodput:.1%} | {g.goodput / base.goodput:.2f}x | "
              f"{g.to_first_step:.1f} | {g.after_last_step:.1f} |")
    for label, g in (("baseline", base), ("failures", faults)):
        if g.estimated:
            print(f"  {label}: {g.estimated} final-trajectory step(s) had no metric point; counted at the median "
                  "step time")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ab", help="a: recovery time split; b: goodput")
    parser.add_argument("--kills", type=int, default=3, help="kills measured in part a (median)")
    parser.add_argument("--minutes", type=float, default=6.0, help="part b: length of the job without failures")
    parser.add_argument("--failure-every", type=float, default=120.0, help="part b: seconds between kills")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--interval", type=int, default=10, help="a checkpoint every this many steps")
    parser.add_argument("--sync-saves", action="store_true", help="checkpoint.async_save false")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="RH_TEST_STEP_SLEEP for the ranks")
    parser.add_argument("--backoff", type=float, default=0.1,
                        help="ReconcilerSettings.restart_backoff_seconds (the base; doubles per restart without progress)")
    parser.add_argument("--reconcile-interval", type=float, default=ReconcilerSettings().interval_seconds)
    parser.add_argument("--seed", type=int, default=None, help="for the choice of rank and kill step")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (below) on `timeout` or kill, too
    chance = random.Random(args.seed)
    settings = ReconcilerSettings(interval_seconds=args.reconcile_interval, restart_backoff_seconds=args.backoff)
    print(f"Recovery benchmark, {platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores); "
          f"model layers {args.layers}, hidden {args.hidden}, seq {args.seq}, global batch {args.batch}, dp {args.dp}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="rh-recovery-bench-") as tmp:
        plane = Plane(Path(tmp) / "home", settings)
        try:
            step_wall, startup = 1.0, 30.0
            if "a" in args.parts:
                step_wall, startup = part_a(plane, args, chance)
            if "b" in args.parts:
                if "a" not in args.parts:  # size the jobs from a short calibration run
                    name, submitted = plane.submit(job_spec(args, "calibration", steps=2 * args.interval + 2))
                    plane.wait(name, lambda j: j.state in TERMINAL, timeout=600)
                    ms = plane.metrics(name)
                    gaps = [epoch(b.time) - epoch(a.time) for a, b in zip(ms, ms[1:]) if b.step == a.step + 1]
                    step_wall = statistics.median(gaps) if gaps else 1.0
                    startup = epoch(ms[0].time) - submitted if ms else 30.0
                part_b(plane, args, chance, step_wall, startup)
        finally:
            plane.close()
            for pid in leftover_pids(plane.home):  # only if something went wrong: every job has ended
                problem(f"a rank process ({pid}) outlived its job; killed")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    if PROBLEMS:
        print("Problems with what the control plane provides:")
        for p in PROBLEMS:
            print(f"  - {p}")


if __name__ == "__main__":
    main()
