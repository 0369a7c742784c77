"""Who may do what: the one place that decides. The gRPC servicers and the dashboard call `authorize`
before they act; `orchestrator.auth` only says who a token belongs to (authentication).

The rule: any user with a valid token may submit jobs and sweeps and read every job (its state, events,
checkpoints, metrics and logs) and sweep; admins may cancel any job or sweep, other users only those they own. A rank may report only
for its own job and attempt.

A spec's `env` values (tokens, passwords) are read only by the job's or sweep's owner and admins: everyone else
sees their names with REDACTED_ENV_VALUE as each value. `visible_spec` is the one place that applies this; every
view of a spec (the gRPC messages of jobs and sweeps, streams included, and anything the dashboard shows) is built
from what it returns."""

from __future__ import annotations

import enum
import hmac

from contract.spec import REDACTED_ENV_VALUE
from orchestrator.auth import ADMIN, Principal, job_token
from orchestrator.service.errors import PermissionDenied, Unauthenticated
from orchestrator.store import Job, Sweep


class Action(enum.StrEnum):
    SUBMIT = "submit"
    READ = "read"
    READ_ENV = "read the env values of"
    CANCEL = "cancel"


def allowed(principal: Principal | None, action: Action, job: Job | Sweep | None = None) -> bool:
    if principal is None:
        return False
    if action in (Action.CANCEL, Action.READ_ENV):
        return principal.role == ADMIN or (job is not None and principal.user == job.owner)
    return True


def authorize(principal: Principal | None, action: Action, job: Job | Sweep | None = None) -> None:
    """Returns if `principal` may do `action` (on `job`, or a sweep); raises Unauthenticated or PermissionDenied."""
    if principal is None:
        raise Unauthenticated("a valid token is required")
    if not allowed(principal, action, job):
        what = f" {job.resource_name}" if job is not None else ""
        raise PermissionDenied(f"{principal.user} may not {action.value}{what} (only its owner "
                               f"{(job.owner if job is not None else '') or '(none)'} or an admin)")


def visible_spec(principal: Principal | None, resource: Job | Sweep) -> dict:
    """The stored spec of a job or sweep as `principal` may see it: as stored for its owner and admins; for
    anyone else every `env` value (a job's; a sweep's proxy's and target's) replaced by REDACTED_ENV_VALUE.
    The stored row is never changed."""
    spec = resource.spec
    if allowed(principal, Action.READ_ENV, resource):
        return spec
    if isinstance(resource, Sweep):
        return {**spec, "proxy": _redacted_env(spec["proxy"]), "target": _redacted_env(spec["target"])}
    return _redacted_env(spec)


def _redacted_env(job_spec: dict) -> dict:
    if not job_spec.get("env"):
        return job_spec
    return {**job_spec, "env": {name: REDACTED_ENV_VALUE for name in job_spec["env"]}}


def rank_may_report(credential_key: bytes, job: Job | None, attempt: int, token: str | None) -> bool:
    """Whether `token` is the credential of this job's attempt: what the TrainerService asks of every call.
    One answer for "no such job" and "wrong credential": a rank's token proves which job it is."""
    if job is None or token is None:
        return False
    return hmac.compare_digest(token, job_token(credential_key, job.uid, attempt))
