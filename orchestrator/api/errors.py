"""Standard gRPC errors. INVALID_ARGUMENT carries a google.rpc.BadRequest naming each offending field, and
the same text in its message for clients that read only that."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from contract.spec import FieldViolation
from orchestrator import service


def abort_invalid(context: grpc.ServicerContext, violations: Iterable[FieldViolation]):
    violations = list(violations)
    bad_request = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations])
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="; ".join(str(v) for v in violations),
                               details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


def abort_field(context: grpc.ServicerContext, field: str, description: str):
    abort_invalid(context, [FieldViolation(field, description)])


# The service layer's refusals as gRPC status codes (the dashboard maps the same ones to HTTP statuses).
_CODES = {
    service.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    service.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    service.NotFound: grpc.StatusCode.NOT_FOUND,
    service.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    service.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
}


def abort_refused(context: grpc.ServicerContext, error: service.ServiceError):
    """Ends the call with the status that stands for the service layer's refusal."""
    if isinstance(error, service.InvalidArgument):
        abort_field(context, error.field, error.description)
    context.abort(_CODES.get(type(error), grpc.StatusCode.INTERNAL), str(error))


@contextmanager
def refusals(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns a service-layer refusal raised inside the block into the call's status."""
    try:
        yield
    except service.ServiceError as error:
        abort_refused(context, error)
