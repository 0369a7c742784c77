"""Standard gRPC errors. INVALID_ARGUMENT carries a google.rpc.BadRequest naming each offending field, and
the same text in its message for clients that read only that; RESOURCE_EXHAUSTED (an operator's quota) a
google.rpc.QuotaFailure naming the field and the limit. Anything else a handler raises is an internal error:
logged here with an id, and the client gets INTERNAL with that id, never the error's own text (which may hold
a SQL statement or a path)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from contract.spec import FieldViolation
from orchestrator import service

log = logging.getLogger(__name__)

# An error names at most this many fields (each clipped by FieldViolation): a spec with a thousand bad entries
# gets a short answer that says how many more there were.
MAX_VIOLATIONS = 20


def abort_invalid(context: grpc.ServicerContext, violations: Iterable[FieldViolation]):
    violations = list(violations)
    if len(violations) > MAX_VIOLATIONS:
        more = len(violations) - MAX_VIOLATIONS
        violations = violations[:MAX_VIOLATIONS] + [FieldViolation(violations[MAX_VIOLATIONS].field,
                                                                   f"and {more} more violation(s) not shown")]
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
    service.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def abort_refused(context: grpc.ServicerContext, error: service.ServiceError):
    """Ends the call with the status that stands for the service layer's refusal."""
    if isinstance(error, service.InvalidArgument):
        abort_field(context, error.field, error.description)
    if isinstance(error, service.ResourceExhausted):
        abort_exhausted(context, error.field, error.description)
    context.abort(_CODES.get(type(error), grpc.StatusCode.INTERNAL), str(error))


def abort_exhausted(context: grpc.ServicerContext, field: str, description: str):
    """RESOURCE_EXHAUSTED for a quota: a QuotaFailure whose subject is the request field over it."""
    violation = FieldViolation(field, description)  # clipped like any other
    quota = error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject=violation.field, description=violation.description)])
    detail = any_pb2.Any()
    detail.Pack(quota)
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(violation), details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


@contextmanager
def refusals(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns a service-layer refusal raised inside the block into the call's status."""
    try:
        yield
    except service.ServiceError as error:
        abort_refused(context, error)


# -- internal errors -----------------------------------------------------------------------------------------


class InternalErrors(grpc.ServerInterceptor):
    """Ends a call whose handler raised anything but an abort with INTERNAL and an error id; the error itself
    is logged under that id. Without it gRPC answers UNKNOWN with the exception's text."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method))
        return handler  # no client- or bidirectional-streaming calls in this API


def _guard_unary(behavior, method: str):
    def guarded(request, context):
        try:
            return behavior(request, context)
        except Exception as exc:  # noqa: BLE001 (the point: nothing unexpected reaches the client)
            _abort_internal(context, exc, method)
    return guarded


def _guard_stream(behavior, method: str):
    def guarded(request, context):
        try:
            yield from behavior(request, context)
        except Exception as exc:  # noqa: BLE001
            _abort_internal(context, exc, method)
    return guarded


def _abort_internal(context: grpc.ServicerContext, exc: Exception, method: str):
    if context.code() is not None:  # the handler aborted on purpose (grpc raises a bare Exception for it)
        raise exc
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server's log has the details")
