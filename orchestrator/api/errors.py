"""Standard gRPC errors. INVALID_ARGUMENT carries a google.rpc.BadRequest naming each offending field, and
the same text in its message for clients that read only that; RESOURCE_EXHAUSTED (an operator's quota) a
google.rpc.QuotaFailure naming the field and the limit. Anything else a handler raises is an internal error:
logged here with an id, and the client gets INTERNAL with that id, never the error's own text (which may hold
a SQL statement or a path); but a database that cannot be reached now (a PostgreSQL restarting) is
UNAVAILABLE, which clients retry, with an id the log has too."""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from contract.spec import FieldViolation
from orchestrator import service
from orchestrator.store.db import database_unavailable

log = logging.getLogger(__name__)

# An error names at most this many fields, in at most this many characters (each field and description is
# clipped by FieldViolation): a spec with a thousand bad entries gets a short answer that says how many more
# there were, and the status (its message and the BadRequest beside it) stays far below gRPC's 8 KiB limit on
# metadata.
MAX_VIOLATIONS = 20
MAX_MESSAGE = 2000


def invalid_status(violations: Iterable[FieldViolation]) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming each field (the first that fit, see _shown)."""
    violations = _shown(list(violations))
    bad_request = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations])
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="; ".join(str(v) for v in violations),
                               details=[detail])
    return rpc_status.to_status(status)


def abort_invalid(context: grpc.ServicerContext, violations: Iterable[FieldViolation]):
    _abort_with_status(context, invalid_status(violations))


def _shown(violations: list[FieldViolation]) -> list[FieldViolation]:
    """The first violations that fit MAX_VIOLATIONS and MAX_MESSAGE, and a last one saying how many more."""
    shown: list[FieldViolation] = []
    size = 0
    for violation in violations:
        size += len(str(violation)) + 2
        if shown and (len(shown) == MAX_VIOLATIONS or size > MAX_MESSAGE):
            break
        shown.append(violation)
    more = len(violations) - len(shown)
    if more:
        shown.append(FieldViolation(violations[len(shown)].field, f"and {more} more violation(s) not shown"))
    return shown


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


class _Status(NamedTuple):  # what grpc_status.rpc_status.to_status makes, for a code without details
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


def refusal_status(error: service.ServiceError) -> grpc.Status:
    """The status that stands for the service layer's refusal."""
    if isinstance(error, service.InvalidArgument):
        return invalid_status([FieldViolation(error.field, error.description)])
    if isinstance(error, service.ResourceExhausted):
        return exhausted_status(error.field, error.description)
    return _Status(_CODES.get(type(error), grpc.StatusCode.INTERNAL), str(error), ())


def abort_refused(context: grpc.ServicerContext, error: service.ServiceError):
    """Ends the call with the status that stands for the service layer's refusal."""
    _abort_with_status(context, refusal_status(error))


async def abort_refused_async(context: grpc.aio.ServicerContext, error: service.ServiceError):
    """abort_refused, for a handler that runs on the event loop (the streams)."""
    status = refusal_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def exhausted_status(field: str, description: str) -> grpc.Status:
    """RESOURCE_EXHAUSTED for a quota: a QuotaFailure whose subject is the request field over it."""
    violation = FieldViolation(field, description)  # clipped like any other
    quota = error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject=violation.field, description=violation.description)])
    detail = any_pb2.Any()
    detail.Pack(quota)
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(violation), details=[detail])
    return rpc_status.to_status(status)


def _abort_with_status(context: grpc.ServicerContext, status: grpc.Status):
    """Ends the call with `status` and its details. A blocking handler on a grpc.aio server has a context
    without abort_with_status, whose abort takes the trailing metadata instead."""
    if hasattr(context, "abort_with_status"):
        context.abort_with_status(status)
    context.abort(status.code, status.details, status.trailing_metadata)


@contextmanager
def refusals(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns a service-layer refusal raised inside the block into the call's status."""
    try:
        yield
    except service.ServiceError as error:
        abort_refused(context, error)


# -- internal errors -----------------------------------------------------------------------------------------


class InternalErrors(grpc.ServerInterceptor):
    """Ends a call whose handler raised anything but an abort with INTERNAL and an error id (UNAVAILABLE when
    the database cannot be reached); the error itself is logged under that id. Without it gRPC answers UNKNOWN
    with the exception's text."""

    def intercept_service(self, continuation, handler_call_details):
        return _guarded(continuation(handler_call_details), handler_call_details.method)


class AsyncInternalErrors(grpc.aio.ServerInterceptor):
    """InternalErrors for a grpc.aio server: handlers that are blocking functions (on its thread pool),
    coroutines or async generators alike."""

    async def intercept_service(self, continuation, handler_call_details):
        return _guarded(await continuation(handler_call_details), handler_call_details.method)


def _guarded(handler, method: str):
    """`handler` with its behaviour wrapped, keeping its kind (function, generator, coroutine, async generator),
    which is how a grpc.aio server decides where to run it."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=_guard(handler.unary_unary, method))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=_guard(handler.unary_stream, method))
    return handler  # no client- or bidirectional-streaming calls in this API


def _guard(behavior, method: str):
    if inspect.isasyncgenfunction(behavior):
        async def guarded_async_stream(request, context):
            try:
                async for response in behavior(request, context):
                    yield response
            except Exception as exc:  # noqa: BLE001 (the point: nothing unexpected reaches the client)
                await _abort_internal_async(context, exc, method)
        return guarded_async_stream
    if inspect.iscoroutinefunction(behavior):
        async def guarded_coroutine(request, context):
            try:
                return await behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                await _abort_internal_async(context, exc, method)
        return guarded_coroutine
    if inspect.isgeneratorfunction(behavior):
        def guarded_stream(request, context):
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                if _aborted(context, exc):
                    raise
                # The stream ends with the status set, not with an abort: on grpc.aio a blocking generator runs
                # on a thread, and an abort from there races the end of the stream (TOO_MANY_OPERATIONS).
                code, message = failure(exc, method)
                context.set_code(code)
                context.set_details(message)
        return guarded_stream

    def guarded(request, context):
        try:
            return behavior(request, context)
        except Exception as exc:  # noqa: BLE001
            _abort_internal(context, exc, method)
    return guarded


def _aborted(context, exc: Exception) -> bool:
    """Whether `exc` is the handler's own abort: grpc.aio raises AbortError; the thread-based server a bare
    Exception, with the call's code set."""
    if isinstance(exc, grpc.aio.AbortError):
        return True
    code = getattr(context, "code", None)
    return code is not None and code() is not None


def failure(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status for an unexpected error in `method`, logged under a new id that the message carries: the
    database unreachable is UNAVAILABLE (retry; one log line, no traceback: it is not a bug), anything else
    INTERNAL (with its traceback). The error's own text never reaches the client."""
    error_id = uuid.uuid4().hex[:12]
    if database_unavailable(exc):
        log.warning("database unavailable (error %s) in %s: %s", error_id, method,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return grpc.StatusCode.UNAVAILABLE, f"the database is unavailable (id {error_id}); retry the call"
    log.error("internal error %s in %s", error_id, method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server's log has the details"


def _abort_internal(context, exc: Exception, method: str):
    if _aborted(context, exc):
        raise exc
    context.abort(*failure(exc, method))


async def _abort_internal_async(context, exc: Exception, method: str):
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    await context.abort(*failure(exc, method))
