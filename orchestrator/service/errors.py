"""Refusals of the service layer. Each way in maps them to its own status: the gRPC servicers to a
status code (orchestrator/api/errors.py), the dashboard to an HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal whose text is meant for the caller as it is."""


class InvalidArgument(ServiceError):
    """A request field is wrong; `field` names it (its path in the request)."""

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class Unauthenticated(ServiceError):
    pass


class PermissionDenied(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class FailedPrecondition(ServiceError):
    pass


class AlreadyExists(ServiceError):
    pass


class ResourceExhausted(ServiceError):
    """A quota of the operator's (orchestrator/service/limits.py) is used up; `field` names the request field
    that would exceed it."""

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description
