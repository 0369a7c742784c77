"""Who may do what: the one place that decides. The gRPC servicers and the dashboard call `authorize`
before they act; `orchestrator.auth` only says who a token belongs to (authentication).

The rule: any user with a valid token may submit jobs and sweeps and read every job (its state, events,
checkpoints, metrics and logs) and sweep; admins may cancel any job or sweep, other users only those they own. A rank may report only
for its own job and attempt."""

from __future__ import annotations

import enum
import hmac

from orchestrator.auth import ADMIN, Principal, job_token
from orchestrator.service.errors import PermissionDenied, Unauthenticated
from orchestrator.store import Job, Sweep


class Action(enum.StrEnum):
    SUBMIT = "submit"
    READ = "read"
    CANCEL = "cancel"


def allowed(principal: Principal | None, action: Action, job: Job | Sweep | None = None) -> bool:
    if principal is None:
        return False
    if action is Action.CANCEL:
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


def rank_may_report(credential_key: bytes, job: Job | None, attempt: int, token: str | None) -> bool:
    """Whether `token` is the credential of this job's attempt: what the TrainerService asks of every call.
    One answer for "no such job" and "wrong credential": a rank's token proves which job it is."""
    if job is None or token is None:
        return False
    return hmac.compare_digest(token, job_token(credential_key, job.uid, attempt))
