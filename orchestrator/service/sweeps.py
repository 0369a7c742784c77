"""Sweeps as callers see them: create, get, list and cancel, and the view of one sweep (its trials with their
objectives, its target, its tuning cost) that the gRPC servicer and the dashboard both show. Like `jobs`,
every function takes the caller's session and the principal asking and checks `access.authorize` first.

A sweep's trials and target are ordinary jobs (kind "Trial" / "Target", parent "sweeps/<name>"); the sweep
controller creates them. Reading a trial's objective is here, as the controller and the views share it."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from contract.errors import clip
from contract.sweep import GridPoint, SweepSpec, TrialPlan, model_flops, stored_sweep, trial_objective
from orchestrator.auth import Principal
from orchestrator.lifecycle import record_event
from orchestrator.service import pages
from orchestrator.service.access import Action, allowed, authorize
from orchestrator.service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from orchestrator.service.jobs import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page
from orchestrator.store import Job, JobState, Metric, Sweep, SweepState, utcnow

SWEEP_PREFIX = "sweeps/"
# Used with fullmatch: "$" would let "x\n" name the sweep x.
_SWEEP_NAME = re.compile(r"(?:sweeps/)?([a-z0-9]([-a-z0-9]*[a-z0-9])?)")
_LIST_FILTER = "sweeps"  # what a sweep listing's page token is bound to (besides its page size)


def sweep_id(name: str) -> str | None:
    """The id in "sweeps/{id}" or a bare id; None if `name` cannot name a sweep."""
    match = _SWEEP_NAME.fullmatch(name or "") if len(name or "") <= 70 else None
    return match.group(1) if match and len(match.group(1)) <= 63 else None


def create_sweep(session: Session, principal: Principal | None, spec: SweepSpec, warnings: list[str]) -> Sweep:
    """Records a sweep in TUNING (the controller creates its trials). Refused if the sweep or a job of one
    of its trials' or its target's names exists. Call in a writing session, then wake the sweep controller."""
    authorize(principal, Action.SUBMIT)
    if session.get(Sweep, spec.name) is not None:
        raise AlreadyExists(f"sweep sweeps/{spec.name} already exists")
    names = [spec.trial_job_name(p.index) for p in spec.trials()] + [spec.target_job_name]
    taken = session.scalars(select(Job.name).where(Job.name.in_(names)).limit(1)).first()
    if taken is not None:
        raise AlreadyExists(f"job jobs/{taken} exists, and sweep sweeps/{spec.name} would name one of its "
                            f"trials or its target so; choose another sweep name")
    now = utcnow()
    sweep = Sweep(name=spec.name, uid=str(uuid.uuid4()), spec=spec.to_dict(), warnings=list(warnings),
                  state=SweepState.TUNING, state_reason="Created", state_message="",
                  owner=principal.user if principal else "", cancel_requested=False, create_time=now, update_time=now)
    session.add(sweep)
    return sweep


def get_sweep(session: Session, principal: Principal | None, name: str, field: str = "name") -> Sweep:
    authorize(principal, Action.READ)
    found = sweep_id(name)
    if found is None:
        raise InvalidArgument(field, f"{clip(name, 100)!r} is not a sweep name (\"sweeps/{{sweep_id}}\")")
    sweep = session.get(Sweep, found)
    if sweep is None:
        raise NotFound(f"sweep sweeps/{found} not found")
    return sweep


def list_sweeps(session: Session, principal: Principal | None, page_size: int = 0, page_token: str = "") -> Page[Sweep]:
    """Sweeps newest first, one page after `page_token`."""
    authorize(principal, Action.READ)
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    filter_key = pages.job_filter_key([_LIST_FILTER], {}, page_size)
    query = select(Sweep).order_by(Sweep.create_time.desc(), Sweep.name.desc()).limit(page_size + 1)
    if page_token:
        after = pages.decode_job_token(page_token, filter_key)
        if after is None:
            raise InvalidArgument("page_token", "not a token from a sweep listing with the same page size")
        created, name = after
        query = query.where(or_(Sweep.create_time < created, and_(Sweep.create_time == created, Sweep.name < name)))
    rows = session.scalars(query).all()
    page = Page(list(rows[:page_size]))
    if len(rows) > page_size:
        last = rows[page_size - 1]
        page.next_page_token = pages.encode_job_token(last.create_time, last.name, filter_key)
    return page


def may_cancel(principal: Principal | None, sweep: Sweep) -> bool:
    return allowed(principal, Action.CANCEL, sweep) and not SweepState(sweep.state).terminal


def cancel_sweep(session: Session, principal: Principal | None, name: str) -> Sweep:
    """Marks the sweep for cancelling: the controller cancels its unfinished trials and target, and the sweep
    is CANCELLED once they have ended. Call in a writing session, then wake the sweep controller."""
    sweep = get_sweep(session, principal, name)
    authorize(principal, Action.CANCEL, sweep)
    if SweepState(sweep.state).terminal:
        raise FailedPrecondition(f"sweep {sweep.resource_name} already ended ({sweep.state}); nothing to cancel")
    if not sweep.cancel_requested:
        sweep.cancel_requested = True
        sweep.state_reason = "CancelRequested"
        sweep.state_message = f"cancel requested by {principal.user}"
        sweep.update_time = utcnow()
    return sweep


def cancel_child(session: Session, job: Job, sweep_name: str) -> bool:
    """Marks one of a sweep's unfinished jobs for cancelling (the job controller stops it); False if there was
    nothing to do. The sweep's cancel was authorized; its children follow it."""
    if JobState(job.state).terminal or job.cancel_requested:
        return False
    job.cancel_requested = True
    attempt = job.current_attempt
    record_event(session, job, "CancelRequested", "CancelRequested", f"cancelled with sweeps/{sweep_name}",
                 attempt=attempt.number if attempt else None)
    return True


# -- a sweep's view: its trials, the choice, the target, the cost -------------------------------------------


def val_losses(session: Session, job_name: str) -> list[float | None]:
    """The job's validation losses by step, oldest first (a step evaluated again after a restart counts once,
    at its newest report)."""
    rows = session.execute(select(Metric.step, Metric.val_loss).where(Metric.job_name == job_name,
                                                                      Metric.val_loss.is_not(None))
                           .order_by(Metric.id)).all()
    by_step = {step: loss for step, loss in rows}
    return [by_step[step] for step in sorted(by_step)]


def objective_of(session: Session, job: Job | None, windows: int) -> float | None:
    """A trial's objective: None while it runs; +inf unless it SUCCEEDED with finite validation losses."""
    if job is None or not JobState(job.state).terminal:
        return None
    if job.state != JobState.SUCCEEDED:
        return math.inf
    return trial_objective(val_losses(session, job.name), windows)


@dataclass
class TrialView:
    plan: TrialPlan
    job_name: str
    job: Job | None  # None: not created yet
    objective: float | None
    wall_seconds: float


@dataclass
class SweepView:
    sweep: Sweep
    spec: SweepSpec
    trials: list[TrialView]
    target: Job | None
    best: GridPoint | None
    tuning_flops_ratio: float  # trials' FLOPs so far ÷ the target's planned FLOPs
    tuning_wall_seconds: float


def sweep_view(session: Session, sweep: Sweep) -> SweepView:
    spec = stored_sweep(sweep.spec)
    children = {j.name: j for j in session.scalars(select(Job).where(Job.parent == sweep.resource_name))}
    now = utcnow()
    trials = []
    for plan in spec.trials():
        name = spec.trial_job_name(plan.index)
        job = children.get(name)
        trials.append(TrialView(plan, name, job, objective_of(session, job, spec.eval_windows), _wall(job, now)))
    trial_flops = sum(model_flops(spec.proxy, t.job.current_step) for t in trials if t.job is not None)
    target_flops = model_flops(spec.target, spec.target.training.steps)
    best = None
    if sweep.best:
        best = GridPoint(sweep.best["learning_rate"], sweep.best["weight_decay"],
                         tuple((f, v) for f, v in sweep.best.get("hyperparameters", {}).items()))
    return SweepView(sweep, spec, trials, children.get(spec.target_job_name), best, trial_flops / target_flops,
                     sum(t.wall_seconds for t in trials))


def _wall(job: Job | None, now: datetime) -> float:
    if job is None or job.start_time is None:
        return 0.0
    return ((job.end_time or now) - job.start_time).total_seconds()

