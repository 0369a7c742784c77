"""The sweep controller: moves each unfinished sweep one step per pass, on the controller runtime.

A sweep owns ordinary jobs: its trials (kind "Trial") and its target (kind "Target"), each with parent
"sweeps/<name>" and a name that depends on the sweep's spec alone ("<sweep>-t<index>", "<sweep>-target").
The job controller runs them like any other job, so they share the launcher's capacity with every other job.
A pass reads the sweep's row and its children and acts by name: a child is created if no job of its name
exists, and adopted if one does (create-or-adopt), so a control plane killed anywhere in a pass never
duplicates a trial. Nothing lives in memory between passes.

A pass: a cancelled sweep cancels its unfinished children and ends once they have; otherwise trials are
created in grid order while fewer than `max_parallel` run; once every trial has ended the best point is chosen
(contract.sweep.choose_best: failed, missing or NaN = +inf, ties to the smaller learning rate), the target is
created with its hyperparameters, and the sweep mirrors the target's end. Children tell the sweep nothing:
an unfinished sweep is looked at every `interval_seconds`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select

from contract.spec import JobSpec
from contract.sweep import GridPoint, SweepSpec, choose_best, point_objectives, stored_sweep
from orchestrator.controller.runtime import ControllerRuntime, Requeue
from orchestrator.service.jobs import new_job
from orchestrator.service.sweeps import cancel_child, objective_of
from orchestrator.store import (TARGET_KIND, TRIAL_KIND, Database, Job, JobState, NameTaken, Sweep, SweepState,
                                utcnow)

log = logging.getLogger(__name__)

# What the sweep becomes when its target ends.
_MIRRORED = {JobState.SUCCEEDED: SweepState.SUCCEEDED, JobState.FAILED: SweepState.FAILED,
             JobState.CANCELLED: SweepState.CANCELLED}


class SweepController:
    def __init__(self, db: Database, wake_job: Callable[[str], None], workers: int = 2,
                 interval_seconds: float = 1.0, resync_seconds: float = 30.0):
        self.db = db
        self.wake_job = wake_job  # the job controller's: a child created or cancelled is looked at at once
        self.interval_seconds = interval_seconds
        self.runtime = ControllerRuntime("sweeps", self.reconcile, self.unfinished_sweeps, workers, resync_seconds)

    def start(self) -> None:
        self.runtime.start()

    def stop(self) -> None:
        self.runtime.stop()

    def wake(self, sweep_name: str) -> None:
        """A user changed a sweep (created, cancelled): look at it now."""
        self.runtime.notify(sweep_name)

    def unfinished_sweeps(self) -> list[str]:
        with self.db.read() as session:
            return list(session.scalars(select(Sweep.name).where(Sweep.state.in_(
                [SweepState.TUNING.value, SweepState.TRAINING_TARGET.value])).order_by(Sweep.create_time)))

    # -- one pass ------------------------------------------------------------------------------------------

    def reconcile(self, name: str) -> Requeue:
        with self.db.read() as session:
            sweep = session.get(Sweep, name)
            if sweep is None or SweepState(sweep.state).terminal:
                return None
            spec = stored_sweep(sweep.spec)
            owner, parent, cancel = sweep.owner, sweep.resource_name, sweep.cancel_requested
            children = {j.name: j for j in session.scalars(select(Job).where(Job.parent == parent))}
            objectives = {plan.index: objective_of(session, children.get(spec.trial_job_name(plan.index)),
                                                   spec.eval_windows) for plan in spec.trials()}
        if cancel:
            return self._cancel(name, children)

        # Trials: create the missing ones in grid order while fewer than max_parallel run.
        plans = spec.trials()
        running = sum(1 for p in plans if (job := children.get(spec.trial_job_name(p.index))) is not None
                      and not JobState(job.state).terminal)
        missing = [p for p in plans if spec.trial_job_name(p.index) not in children]
        for plan in missing[:max(0, spec.max_parallel - running)]:
            if not self._create_or_adopt(name, spec.trial_spec(plan), TRIAL_KIND, parent, owner):
                return None
        if missing or running:
            self._set_state(name, SweepState.TUNING, "TrialsRunning",
                            f"{len(plans) - len(missing) - running} of {len(plans)} trials ended")
            return self.interval_seconds

        # Every trial ended: the choice is a function of their final rows, the same on every pass.
        chosen = choose_best(point_objectives([(p, objectives[p.index]) for p in plans]))
        if chosen is None:
            self._finish(name, SweepState.FAILED, "NoTrialSucceeded",
                         "no trial ended with a finite validation loss; the target was not started")
            return None
        point, objective = chosen
        target = children.get(spec.target_job_name)
        if target is None:
            best = _best_record(spec, point, objective)
            self._record_best(name, best)
            if not self._create_or_adopt(name, spec.target_spec(point), TARGET_KIND, parent, owner):
                return None
            self._set_state(name, SweepState.TRAINING_TARGET, "TargetRunning",
                            f"{spec.target_job_name} started with learning_rate={point.learning_rate:g}")
            return self.interval_seconds
        if JobState(target.state).terminal:
            self._finish(name, _MIRRORED[JobState(target.state)], f"Target{target.state.title()}",
                         f"jobs/{target.name}: {target.state_reason} {target.state_message}".strip())
            return None
        self._set_state(name, SweepState.TRAINING_TARGET, "TargetRunning", f"jobs/{target.name} is {target.state}")
        return self.interval_seconds

    # -- actions -------------------------------------------------------------------------------------------

    def _create_or_adopt(self, sweep: str, spec: JobSpec, kind: str, parent: str, owner: str) -> bool:
        """Creates the child job, or adopts the one of its name (made by a pass a crash interrupted). False if a
        job of that name belongs to something else: the sweep fails."""
        try:
            self.db.create_job(new_job(spec, owner, kind=kind, parent=parent,
                                       message=f"{kind.lower()} of {parent}, submitted by {owner or 'unknown'}"))
        except NameTaken:
            with self.db.read() as session:
                holder = session.get(Job, spec.name)
                ours = holder is not None and holder.parent == parent
            if not ours:
                self._finish(sweep, SweepState.FAILED, "NameTaken",
                             f"job jobs/{spec.name} exists and does not belong to {parent}")
                return False
        self.wake_job(spec.name)
        return True

    def _cancel(self, name: str, children: dict[str, Job]) -> Requeue:
        woken = []
        with self.db.session() as session:
            for child_name, child in children.items():
                job = session.get(Job, child_name)
                if job is not None and cancel_child(session, job, name):
                    woken.append(child_name)
            unfinished = [j for j in children.values() if not JobState(j.state).terminal]
        for child_name in woken:
            self.wake_job(child_name)
        if unfinished:
            return self.interval_seconds
        self._finish(name, SweepState.CANCELLED, "Cancelled", "cancelled; every trial and the target have ended")
        return None

    def _record_best(self, name: str, best: dict) -> None:
        with self.db.session() as session:
            sweep = session.get(Sweep, name)
            if sweep.best != best:
                sweep.best = best
                sweep.update_time = utcnow()

    def _set_state(self, name: str, state: SweepState, reason: str, message: str) -> None:
        with self.db.session() as session:
            sweep = session.get(Sweep, name)
            if SweepState(sweep.state).terminal or sweep.cancel_requested:
                return  # a cancel that came meanwhile is the next pass's
            if (sweep.state, sweep.state_reason, sweep.state_message) != (state, reason, message):
                sweep.state, sweep.state_reason, sweep.state_message = state, reason, message
                sweep.update_time = utcnow()

    def _finish(self, name: str, state: SweepState, reason: str, message: str) -> None:
        with self.db.session() as session:
            sweep = session.get(Sweep, name)
            if SweepState(sweep.state).terminal:
                return
            now = utcnow()
            sweep.state, sweep.state_reason, sweep.state_message = state, reason, message
            sweep.update_time = sweep.end_time = now
        log.info("sweep %s: %s (%s)", name, state, message)


def _best_record(spec: SweepSpec, point: GridPoint, objective: float) -> dict:
    trial = next(p.index for p in spec.trials() if p.point == point)
    return {"trial": trial, "learning_rate": point.learning_rate, "weight_decay": point.weight_decay,
            "hyperparameters": dict(point.hyperparameters), "objective": objective}
