"""A small client of the JobService: finds the server and the token, and turns gRPC errors into messages a
person can act on."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator import config
from roundhouse.v1 import job_service_pb2_grpc


class ClientError(Exception):
    """An error to show as it is, without a traceback."""


class JobClient:
    def __init__(self, address: str, token: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def call(self, method: str, request, timeout: float | None = 30.0):
        """A unary call; raises ClientError with the status code and details on failure."""
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise ClientError(describe(exc)) from None

    def stream(self, method: str, request, timeout: float | None = None):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def connect(server: str | None = None, token: str | None = None) -> JobClient:
    address = config.server_address(server)
    token = config.user_token(token)
    if not token:
        raise ClientError(
            f"no API token: set ROUNDHOUSE_TOKEN or pass --token (a server started with `roundhouse serve` "
            f"writes its admin token to {config.token_file(config.home_dir())})")
    return JobClient(address, token)


def describe(exc: grpc.RpcError) -> str:
    """`CODE: details`, plus one line per field violation for INVALID_ARGUMENT."""
    code = exc.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: no control plane answers ({exc.details()})"
    lines = [f"{code.name}: {exc.details()}"]
    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            lines = [f"{code.name}: the request was refused"]
            lines += [f"  {v.field}: {v.description}" for v in bad_request.field_violations]
    return "\n".join(lines)


def job_name(name: str) -> str:
    """Accepts "NAME" or "jobs/NAME"."""
    return name if name.startswith("jobs/") else f"jobs/{name}"
