"""A small client of the JobService and the SweepService: finds the server and the token, sends the token
with every call, and turns gRPC errors into messages a person can act on.

Every failure surfaces as `ClientError`, whose text is meant to be shown as it is (no traceback) and whose
`code` says which gRPC status it came from (None when no call was made)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator import config
from roundhouse.v1 import job_pb2, job_service_pb2 as js, job_service_pb2_grpc, sweep_pb2
from roundhouse.v1 import sweep_service_pb2 as ss, sweep_service_pb2_grpc

JOB_PREFIX = "jobs/"
SWEEP_PREFIX = "sweeps/"
UNARY_TIMEOUT_SECONDS = 30.0
# The most events the server sends in one WatchJob update; a shorter batch is the end of the history.
WATCH_EVENT_BATCH = 1000
# A call answered UNAVAILABLE is tried again a few times (about 4 s at most) before the CLI gives up: on a
# heavily loaded host the server can miss gRPC's connect handshake, and the call then fails at once without
# ever reaching it. The server answers UNAVAILABLE itself only when it could not reach its database, so
# nothing was written and a CreateJob may be sent again (were the database lost after a commit, the second
# try would answer ALREADY_EXISTS for a job that exists).
RETRY_ATTEMPTS = 5
SERVICE_CONFIG = {"methodConfig": [{
    "name": [{"service": js.DESCRIPTOR.services_by_name["JobService"].full_name},
             {"service": ss.DESCRIPTOR.services_by_name["SweepService"].full_name}],
    "retryPolicy": {"maxAttempts": RETRY_ATTEMPTS, "initialBackoff": "0.25s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]}
# gRPC's own reconnect backoff grows to two minutes; a CLI waiting out a control-plane restart should notice
# the new server within a few seconds.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG)))


class ClientError(Exception):
    """An error to show as it is, without a traceback."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClientTls:
    """What a client needs for TLS, as files: the CA to trust (None: the system's), and a certificate and key
    to present to a server that asks for one (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca, "--tls-ca / ROUNDHOUSE_TLS_CA"),
                                            private_key=_pem(self.key, "ROUNDHOUSE_TLS_CLIENT_KEY"),
                                            certificate_chain=_pem(self.cert, "ROUNDHOUSE_TLS_CLIENT_CERT"))


def _pem(path: str | None, where: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path} ({where}): {exc.strerror or exc}") from None


class JobClient:
    """Typed calls of roundhouse.v1.JobService and SweepService. Names may be given as "NAME", "jobs/NAME" or
    "sweeps/NAME"."""

    def __init__(self, address: str, token: str, tls: ClientTls | None = None):
        """`address`: HOST:PORT, or grpcs://HOST:PORT for TLS (grpc://HOST:PORT: plaintext). TLS also when `tls`
        is given (its CA, and a client certificate for a server that asks for one)."""
        scheme, _, rest = address.rpartition("://")
        if scheme not in ("", "grpc", "grpcs"):
            raise ClientError(f"{address!r}: the server is HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS)")
        self.address = address
        if scheme == "grpcs" or tls is not None:
            credentials = (tls or ClientTls()).channel_credentials()
            self.channel = grpc.secure_channel(rest, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(rest, options=CHANNEL_OPTIONS)
        self.stub = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.sweeps = sweep_service_pb2_grpc.SweepServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -- unary calls ---------------------------------------------------------------------------------------

    def create_job(self, spec: job_pb2.JobSpec) -> job_pb2.Job:
        return self._call("CreateJob", js.CreateJobRequest(spec=spec))

    def get_job(self, name: str) -> job_pb2.Job:
        return self._call("GetJob", js.GetJobRequest(name=job_name(name)))

    def list_jobs(self, states: Iterable[int] = (), labels: Mapping[str, str] | None = None, page_size: int = 0,
                  page_token: str = "", view: int = js.JOB_VIEW_BASIC) -> js.ListJobsResponse:
        """A page of jobs; in the basic view (the default) each job's spec holds only its parallelism."""
        return self._call("ListJobs", js.ListJobsRequest(states=list(states), labels=dict(labels or {}),
                                                         page_size=page_size, page_token=page_token, view=view))

    def list_checkpoints(self, name: str, page_size: int = 0, page_token: str = "") -> js.ListCheckpointsResponse:
        return self._call("ListCheckpoints", js.ListCheckpointsRequest(parent=job_name(name), page_size=page_size,
                                                                       page_token=page_token))

    def cancel_job(self, name: str) -> job_pb2.Job:
        return self._call("CancelJob", js.CancelJobRequest(name=job_name(name)))

    # -- sweeps (roundhouse.v1.SweepService, on the same channel) -------------------------------------------

    def create_sweep(self, spec: sweep_pb2.SweepSpec) -> sweep_pb2.Sweep:
        return self._call("CreateSweep", ss.CreateSweepRequest(spec=spec), self.sweeps)

    def get_sweep(self, name: str) -> sweep_pb2.Sweep:
        return self._call("GetSweep", ss.GetSweepRequest(name=sweep_name(name)), self.sweeps)

    def list_sweeps(self, page_size: int = 0, page_token: str = "") -> ss.ListSweepsResponse:
        return self._call("ListSweeps", ss.ListSweepsRequest(page_size=page_size, page_token=page_token), self.sweeps)

    def cancel_sweep(self, name: str) -> sweep_pb2.Sweep:
        return self._call("CancelSweep", ss.CancelSweepRequest(name=sweep_name(name)), self.sweeps)

    def watch_sweep(self, name: str) -> Iterator[sweep_pb2.Sweep]:
        """The sweep now, then each change until it ends."""
        return self._stream("WatchSweep", ss.WatchSweepRequest(name=sweep_name(name)), stub=self.sweeps)

    # -- streams -------------------------------------------------------------------------------------------

    def watch_job(self, name: str, after_event_id: int = 0, after_step: int = -1) -> Iterator[js.JobUpdate]:
        """The job now, then each change until it ends. Past metric points are skipped by default."""
        return self._stream("WatchJob", js.WatchJobRequest(name=job_name(name), after_event_id=after_event_id,
                                                           after_step=after_step))

    def stream_logs(self, name: str, rank: int = 0, attempt: int = 0, follow: bool = False, offset: int = 0,
                    tail_bytes: int = 0, tail_lines: int = 0) -> Iterator[js.LogChunk]:
        """A rank's log in chunks, from its start, a byte `offset` (a chunk's next_offset) or its tail."""
        return self._stream("StreamLogs", js.StreamLogsRequest(name=job_name(name), rank=rank, attempt=attempt,
                                                               follow=follow, offset=offset, tail_bytes=tail_bytes,
                                                               tail_lines=tail_lines))

    def job_events(self, name: str) -> list[job_pb2.Event]:
        """Every event of the job so far, oldest first: the history a watch sends before any change."""
        events: list[job_pb2.Event] = []
        # A deadline: a history of exactly a multiple of the batch, on a job that then stays still, would
        # otherwise wait for its next change.
        updates = self._stream("WatchJob", js.WatchJobRequest(name=job_name(name), after_step=-1),
                               timeout=UNARY_TIMEOUT_SECONDS)
        try:
            with closing(updates):
                for update in updates:
                    events += update.events
                    if len(update.events) < WATCH_EVENT_BATCH:
                        break
        except ClientError as exc:
            if exc.code is not grpc.StatusCode.DEADLINE_EXCEEDED or not events:
                raise
        return events

    # -- plumbing ------------------------------------------------------------------------------------------

    def _call(self, method: str, request, stub=None):
        try:
            return getattr(stub or self.stub, method)(request, metadata=self.metadata, timeout=UNARY_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            raise ClientError(describe(exc, self.address), exc.code()) from None

    def _stream(self, method: str, request, timeout: float | None = None, stub=None) -> Iterator:
        call = getattr(stub or self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise ClientError(describe(exc, self.address), exc.code()) from None
        finally:
            call.cancel()  # a caller that stops reading early must not leave the stream open on the server


def connect(server: str | None = None, token: str | None = None, tls_ca: str | None = None) -> JobClient:
    """A client of the control plane at `server` (else $ROUNDHOUSE_SERVER, else the local default), with
    `token` (else $ROUNDHOUSE_TOKEN, else the admin token a local `roundhouse serve` wrote). TLS with a
    grpcs:// server or a CA (`tls_ca`, else $ROUNDHOUSE_TLS_CA); a client certificate from
    $ROUNDHOUSE_TLS_CLIENT_CERT and $ROUNDHOUSE_TLS_CLIENT_KEY for a server that asks for one."""
    address = config.server_address(server)
    tls = config.client_tls(tls_ca)
    resolved = config.user_token(token)
    if not resolved:
        home = config.home_dir()
        raise ClientError(
            f"no API token found. The CLI looks for --token, then ROUNDHOUSE_TOKEN, then the admin token that "
            f"`roundhouse serve` writes to its home directory, here {config.token_file(home)} (ROUNDHOUSE_HOME "
            f"or ~/.roundhouse). For a server started with `roundhouse serve --home DIR`, set "
            f"ROUNDHOUSE_HOME=DIR; for another machine's server, pass --token or set ROUNDHOUSE_TOKEN.")
    return JobClient(address, resolved, ClientTls(*tls) if tls else None)


def describe(exc: grpc.RpcError, address: str | None = None) -> str:
    """`CODE: details`; for INVALID_ARGUMENT, one `field: description` line per google.rpc.BadRequest
    violation the server attached."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code is None:
        return f"RPC failed: {details or exc!r}"
    if code is grpc.StatusCode.UNAVAILABLE:
        where = f" at {address}" if address else ""
        return (f"UNAVAILABLE: no control plane answers{where} ({details}); start one with `roundhouse serve` "
                f"or point --server / ROUNDHOUSE_SERVER at it")
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: {details} (check --token / ROUNDHOUSE_TOKEN)"
    violations = field_violations(exc)
    if violations:
        return "\n".join([f"{code.name}: the server refused the request"]
                         + [f"  {field}: {description}" for field, description in violations])
    return f"{code.name}: {details}"


def field_violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of a google.rpc.BadRequest in the error's rich status, if any."""
    try:
        status = rpc_status.from_call(exc)
    except (ValueError, AttributeError, TypeError):  # no call attached, or a status that contradicts the code
        return []
    out = []
    for detail in status.details if status else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            out += [(v.field, v.description) for v in bad_request.field_violations]
    return out


def job_name(name: str) -> str:
    """The resource name of a job given as "NAME" or "jobs/NAME"."""
    name = name.strip()
    return name if name.startswith(JOB_PREFIX) else f"{JOB_PREFIX}{name}"


def sweep_name(name: str) -> str:
    """The resource name of a sweep given as "NAME" or "sweeps/NAME"."""
    name = name.strip()
    return name if name.startswith(SWEEP_PREFIX) else f"{SWEEP_PREFIX}{name}"


def short_name(name: str) -> str:
    """"jobs/NAME" -> "NAME"."""
    return name.removeprefix(JOB_PREFIX)
