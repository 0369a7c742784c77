"""Standard gRPC errors. INVALID_ARGUMENT carries a google.rpc.BadRequest naming each offending field, and
the same text in its message for clients that read only that."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from contract.spec import FieldViolation


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
