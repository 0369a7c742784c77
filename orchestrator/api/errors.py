"""Standard gRPC errors. INVALID_ARGUMENT carries a google.rpc.BadRequest naming each offending field, and
the same text in its message for clients that read only that."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from contract.spec import FieldViolation
from orchestrator import service


def invalid_status(violations: Iterable[FieldViolation]) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming each field."""
    violations = list(violations)
    bad_request = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations])
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="; ".join(str(v) for v in violations),
                               details=[detail])
    return rpc_status.to_status(status)


def abort_invalid(context: grpc.ServicerContext, violations: Iterable[FieldViolation]):
    # The server is grpc.aio: a blocking handler's context has abort (with trailing metadata), not abort_with_status.
    status = invalid_status(violations)
    context.abort(status.code, status.details, status.trailing_metadata)


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


def refusal_status(error: service.ServiceError) -> grpc.Status:
    """The status that stands for the service layer's refusal."""
    if isinstance(error, service.InvalidArgument):
        return invalid_status([FieldViolation(error.field, error.description)])
    return _Status(_CODES.get(type(error), grpc.StatusCode.INTERNAL), str(error), ())


def abort_refused(context: grpc.ServicerContext, error: service.ServiceError):
    """Ends the call with the status that stands for the service layer's refusal."""
    status = refusal_status(error)
    context.abort(status.code, status.details, status.trailing_metadata)


async def abort_refused_async(context: grpc.aio.ServicerContext, error: service.ServiceError):
    """abort_refused, for a handler that runs on the event loop (the streams)."""
    status = refusal_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


class _Status(NamedTuple):  # what grpc_status.rpc_status.to_status makes, for a code without details
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


@contextmanager
def refusals(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns a service-layer refusal raised inside the block into the call's status."""
    try:
        yield
    except service.ServiceError as error:
        abort_refused(context, error)
