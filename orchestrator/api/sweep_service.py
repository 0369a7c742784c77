"""roundhouse.v1.SweepService: µP sweeps. Like JobService, handlers validate at the edge (contract.sweep),
write durable intent and wake the sweep controller; queries and who may do what are the service layer's
(orchestrator/service/sweeps.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from sqlalchemy.exc import IntegrityError

from contract.errors import FieldViolation, SpecError
from contract.spec import JobSpec
from contract.sweep import sweep_dict_to_proto, sweep_from_proto
from orchestrator.api.convert import job_state_to_proto, timestamp
from orchestrator.api.errors import abort_field, abort_invalid, abort_refused_async, refusals
from orchestrator.api.streams import Streams
from orchestrator.auth import Principal, UserTokens, bearer_token
from orchestrator.service import AlreadyExists, ServiceError, access, sweeps
from orchestrator.service.access import Action
from orchestrator.service.limits import Limits, Quotas
from orchestrator.service.sweeps import SweepView
from orchestrator.store import Database, SweepState
from roundhouse.v1 import sweep_pb2, sweep_service_pb2, sweep_service_pb2_grpc

WATCH_POLL_SECONDS = 0.5


class SweepService(sweep_service_pb2_grpc.SweepServiceServicer):
    def __init__(self, db: Database, users: UserTokens, wake_controller: Callable[[str], None], streams: Streams,
                 reach_violations: Callable[[JobSpec], list[FieldViolation]] = lambda spec: [],
                 quotas: Quotas | None = None):
        self.db = db
        self.streams = streams
        # The operator's limits and per-user quotas (orchestrator/service/limits.py), shared with JobService.
        self.quotas = quotas or Quotas(Limits())
        self.users = users
        self.wake_controller = wake_controller
        # What a valid job spec may not reach on this server (data roots, test hooks, directories): server.py.
        self.reach_violations = reach_violations

    def CreateSweep(self, request, context):
        if not request.HasField("spec"):
            abort_invalid(context, [FieldViolation("spec", "required")])
        try:
            spec, warnings = sweep_from_proto(request.spec)
        except SpecError as exc:
            abort_invalid(context, [FieldViolation(_join("spec", v.field), v.description) for v in exc.violations])
        principal = self._principal(context)
        with refusals(context):
            access.authorize(principal, Action.SUBMIT)
        # The trials run the proxy's reach, the target its own; both are held to this server's policy and limits.
        limits = self.quotas.limits
        trial = spec.trial_spec(spec.trials()[0])
        violations = [FieldViolation(f"spec.proxy.{v.field}", v.description)
                      for v in self.reach_violations(trial) + limits.violations(trial)]
        violations += [FieldViolation(f"spec.target.{v.field}", v.description)
                       for v in self.reach_violations(spec.target) + limits.violations(spec.target)]
        if violations:  # nothing is written
            abort_invalid(context, violations)
        spec = dataclasses.replace(spec, proxy=limits.with_defaults(spec.proxy),
                                   target=limits.with_defaults(spec.target))
        owner = principal.user if principal else ""
        # At most max_parallel trials run at once: what the sweep asks of its owner's quota.
        parallel = min(spec.max_parallel, len(spec.trials()))
        with refusals(context), self.quotas.admit(self.db, owner, jobs=parallel, ranks=parallel * trial.world_size,
                                                  field="spec.proxy"):
            try:
                with self.db.session() as session:
                    row = sweeps.create_sweep(session, principal, spec, warnings)
                    name = row.name
            except IntegrityError:  # another replica recorded the same name meanwhile
                raise AlreadyExists(f"sweep sweeps/{spec.name} already exists") from None
        self.wake_controller(name)
        return self._get(principal, name, context)

    def GetSweep(self, request, context):
        return self._get(self._principal(context), request.name, context)

    def ListSweeps(self, request, context):
        if request.view not in _SWEEP_VIEWS:
            abort_field(context, "view", f"unknown view {request.view} (SWEEP_VIEW_BASIC or SWEEP_VIEW_FULL)")
        full = request.view == sweep_service_pb2.SWEEP_VIEW_FULL
        principal = self._principal(context)
        with self.db.read() as session, refusals(context):
            page = sweeps.list_sweeps(session, principal, request.page_size, request.page_token)
            return sweep_service_pb2.ListSweepsResponse(
                sweeps=[sweep_to_proto(sweeps.sweep_view(session, s), principal, full) for s in page.items],
                next_page_token=page.next_page_token)

    def CancelSweep(self, request, context):
        principal = self._principal(context)
        with self.db.session() as session, refusals(context):
            name = sweeps.cancel_sweep(session, principal, request.name).name
        self.wake_controller(name)
        return self._get(principal, name, context)

    async def WatchSweep(self, request, context):
        """A coroutine on the event loop, like WatchJob (orchestrator/api/streams.py)."""
        principal = await self.streams.principal(context)
        async with self.streams.slot(principal, context):
            last = None
            while True:
                try:
                    current = await self.streams.run(self._view, principal, request.name)
                except ServiceError as error:
                    await abort_refused_async(context, error)
                if current != last:
                    yield current
                    last = current
                if current.state in _TERMINAL:
                    return
                await asyncio.sleep(WATCH_POLL_SECONDS)

    # -- helpers -----------------------------------------------------------------------------------------

    def _get(self, principal: Principal | None, name: str, context) -> sweep_pb2.Sweep:
        with refusals(context):
            return self._view(principal, name)

    def _view(self, principal: Principal | None, name: str) -> sweep_pb2.Sweep:
        with self.db.read() as session:
            return sweep_to_proto(sweeps.sweep_view(session, sweeps.get_sweep(session, principal, name)), principal)

    def _principal(self, context) -> Principal | None:
        return self.users.lookup(bearer_token(context.invocation_metadata()))


_TERMINAL = frozenset({sweep_pb2.SWEEP_STATE_SUCCEEDED, sweep_pb2.SWEEP_STATE_FAILED, sweep_pb2.SWEEP_STATE_CANCELLED})


def sweep_state_to_proto(state: str) -> int:
    return sweep_pb2.SweepState.Value(f"SWEEP_STATE_{SweepState(state).value}")


_SWEEP_VIEWS = frozenset(sweep_service_pb2.SweepView.values())


def sweep_to_proto(view: SweepView, principal: Principal | None, full: bool = True) -> sweep_pb2.Sweep:
    """The sweep as `principal` may see it (env values only for its owner and admins: access.visible_spec); with
    `full` False its basic view (SWEEP_VIEW_BASIC): without its spec."""
    row = view.sweep
    spec = sweep_dict_to_proto(access.visible_spec(principal, row)) if full else None
    message = sweep_pb2.Sweep(
        name=row.resource_name, uid=row.uid, spec=spec,
        state=sweep_state_to_proto(row.state),
        state_reason=row.state_reason, state_message=row.state_message, owner=row.owner,
        cancel_requested=row.cancel_requested, warnings=list(row.warnings or []),
        create_time=timestamp(row.create_time), update_time=timestamp(row.update_time),
        end_time=timestamp(row.end_time), tuning_flops_ratio=view.tuning_flops_ratio,
        tuning_wall_seconds=view.tuning_wall_seconds)
    for trial in view.trials:
        message.trials.add(
            job=f"jobs/{trial.job_name}", index=trial.plan.index, learning_rate=trial.plan.point.learning_rate,
            weight_decay=trial.plan.point.weight_decay, seed=trial.plan.seed,
            hyperparameters=dict(trial.plan.point.hyperparameters),
            state=job_state_to_proto(trial.job.state if trial.job else None),
            objective=trial.objective, steps=trial.job.current_step if trial.job else 0,
            wall_seconds=trial.wall_seconds)
    if row.best:
        message.best_trial = f"jobs/{view.spec.trial_job_name(row.best['trial'])}"
        message.best_learning_rate = row.best["learning_rate"]
        message.best_weight_decay = row.best["weight_decay"]
        message.best_hyperparameters.update(row.best.get("hyperparameters", {}))
    if view.target is not None:
        message.target_job = f"jobs/{view.target.name}"
        message.target_state = job_state_to_proto(view.target.state)
    return message


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix

