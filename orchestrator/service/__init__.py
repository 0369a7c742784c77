"""The service layer: queries and authorization over the store, shared by every way in (the gRPC
servicers in orchestrator/api/, the dashboard in orchestrator/dashboard/). Neither way in queries the
store for a user or decides who may do what on its own; each maps `ServiceError`s to its own statuses.

- `access`: who may do what (the one rule)
- `jobs`: get, list, checkpoints, events, metrics, ranks, logs, cancel; the row of a new job
- `sweeps`: create, get, list, cancel; a sweep's trials with their objectives, its target, its tuning cost
- `limits`: the operator's limits and quotas on what a spec may ask for
- `pages`: page tokens
- `errors`: the refusals"""

from orchestrator.service.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                                         ResourceExhausted, ServiceError, Unauthenticated)

__all__ = ["AlreadyExists", "FailedPrecondition", "InvalidArgument", "NotFound", "PermissionDenied",
           "ResourceExhausted", "ServiceError", "Unauthenticated"]
