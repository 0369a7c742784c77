"""Property-based fuzzing of the public API through a real gRPC server (hypothesis), shared by the CI test
(tests/integration/test_fuzz_api.py, a few hundred cases) and `python -m benchmarks.fuzz_api` (10,000 and more).

The inputs are what a hostile or careless client can put on the wire: a valid spec with a few fields
replaced by extreme numbers, NaN, strings with newlines, NUL or 5,000 characters, maps of odd keys, forged page
tokens, enum numbers this server does not know. The properties, for every call:

- it is accepted, or refused with a code a client can act on: never UNKNOWN or INTERNAL;
- an INVALID_ARGUMENT carries a google.rpc.BadRequest naming at least one field, by its path in the request,
  and its message is short (input is not echoed whole);
- a refused CreateJob or CreateSweep writes no row; an accepted one writes exactly one."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st
from sqlalchemy import func, select

from contract.spec import parse_spec, spec_to_proto
from contract.sweep import parse_sweep, sweep_to_proto
from orchestrator.server import ControlPlane
from orchestrator.service.limits import KubernetesLimits, Limits
from orchestrator.store import Job, Sweep
from roundhouse.v1 import job_pb2, job_service_pb2 as js, job_service_pb2_grpc, sweep_pb2
from roundhouse.v1 import sweep_service_pb2 as ss, sweep_service_pb2_grpc

# Limits the fuzzed server runs with: refusals by them are INVALID_ARGUMENT like any other bad field.
FUZZ_LIMITS = Limits(ranks_per_job=64, parameters=10**9, gpus_per_rank=8,
                     kubernetes=KubernetesLimits(images=["registry.example.com/ml/*"], volume_claims=["data"],
                                                 secrets=["data"]))
# A refusal's message stays short whatever the input (gRPC's metadata limit is 8 KiB by default).
MAX_MESSAGE = 8 * 1024
# Codes that say what went wrong: anything else (UNKNOWN, INTERNAL, ...) is a bug.
EXPECTED_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND}

# -- values --------------------------------------------------------------------------------------------------

_AWKWARD_TEXT = ["", "a", "tiny", "nl-test\n", "nl-test\r", "x\0y", "../../etc", "/abs", "jobs/x", "a" * 64,
                 "A" * 5000, " ", "é", "💥", "LD_PRELOAD", "PYTHONPATH", "ok_name", "k8s.io/x", "team", "a/b/c",
                 "registry.example.com/ml/trainer:1", "data", "1e-3", "true"]


def texts(max_size: int = 80) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(_AWKWARD_TEXT), st.text(max_size=max_size),
                     st.text(alphabet="abz09-_./\n\0 A", max_size=max_size))


def _integers() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, -2**63, 10**9, 1 << 20]),
                     st.integers(-2**63, 2**63 - 1))


def _floats() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-3, 1e308]))


def _value_for(descriptor: FieldDescriptor) -> st.SearchStrategy:
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        if descriptor.message_type.fields_by_name["value"].message_type is not None:
            # kubernetes.env_from_secrets: names to {name, key} messages, either of which may be left out
            refs = st.dictionaries(st.sampled_from(["name", "key"]), texts())
            return st.dictionaries(texts(40), refs, max_size=80)
        return st.dictionaries(texts(40), texts(200), max_size=80)
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_INT64:
        return _integers()
    if kind == FieldDescriptor.TYPE_INT32:
        return _integers().filter(lambda v: -2**31 <= v < 2**31)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _floats()
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    return texts()


def _scalar_paths(descriptor, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], FieldDescriptor]]:
    """Every field of the spec a mutation may replace: scalars and maps, by their path."""
    out = []
    for f in descriptor.fields:
        path = (*prefix, f.name)
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            if not f.is_repeated:
                out += _scalar_paths(f.message_type, path)
        else:
            out.append((path, f))
    return out


_SPEC_PATHS = _scalar_paths(job_pb2.JobSpec.DESCRIPTOR)


def _set(message, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        message = getattr(message, part)
    target = getattr(message, path[-1])
    if isinstance(value, dict):
        target.clear()
        for key, item in value.items():
            if isinstance(item, dict):  # a map of messages: fill each value's fields
                for name, text in item.items():
                    setattr(target[key], name, text)
            else:
                target[key] = item
    else:
        setattr(message, path[-1], value)


# -- requests ------------------------------------------------------------------------------------------------

_BASE_SPEC = {"model": {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32},
              "training": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2}}
_NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)


@st.composite
def job_specs(draw) -> job_pb2.JobSpec:
    """A valid spec, then up to four of its fields replaced by values of the field's type from the ranges above."""
    data = {**_BASE_SPEC, "name": draw(_NAMES), "parallelism": {"dp": draw(st.sampled_from([1, 2]))}}
    message = spec_to_proto(parse_spec(data))
    for _ in range(draw(st.integers(0, 4))):
        path, descriptor = draw(st.sampled_from(_SPEC_PATHS))
        _set(message, path, draw(_value_for(descriptor)))
    if draw(st.integers(0, 9)) == 0:
        message.kubernetes.tolerations.add(key=draw(texts()), value=draw(texts()))
    return message


_BASE_SWEEP = {
    "proxy": {"model": {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32, "mup": {"base_hidden_size": 32}},
              "training": {"steps": 20, "eval_interval": 5}},
    "target": {"model": {"layers": 2, "hidden_size": 64, "heads": 2, "seq_length": 32, "mup": {"base_hidden_size": 32}},
               "training": {"steps": 40}},
    "grid": {"learning_rates": [0.01, 0.003]},
    "objective": {"eval_windows": 2},
}


@st.composite
def sweep_specs(draw) -> sweep_pb2.SweepSpec:
    """A valid sweep, then its name, grid, max_parallel, eval_windows or a field of its proxy or target replaced."""
    spec, _ = parse_sweep({**_BASE_SWEEP, "name": draw(_NAMES.filter(lambda n: len(n) <= 40))})
    message = sweep_to_proto(spec)
    numbers = st.lists(_floats(), max_size=draw(st.sampled_from([3, 1200])))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["name", "learning_rates", "weight_decays", "seeds", "hyperparameters",
                                     "max_parallel", "eval_windows", "proxy", "target"]))
        if what == "name":
            message.name = draw(texts())
        elif what in ("learning_rates", "weight_decays"):
            getattr(message.grid, what)[:] = draw(numbers)
        elif what == "seeds":
            message.grid.seeds[:] = draw(st.lists(_integers(), max_size=20))
        elif what == "hyperparameters":
            message.grid.hyperparameters.add(field=draw(texts()), values=draw(st.lists(_floats(), max_size=5)))
        elif what == "max_parallel":
            message.max_parallel = draw(_integers().filter(lambda v: -2**31 <= v < 2**31))
        elif what == "eval_windows":
            message.objective.eval_windows = draw(_integers().filter(lambda v: -2**31 <= v < 2**31))
        else:
            path, descriptor = draw(st.sampled_from([p for p in _SPEC_PATHS if p[0][0] != "name"]))
            _set(getattr(message, what), path, draw(_value_for(descriptor)))
    return message


def _forged_tokens() -> st.SearchStrategy[str]:
    values = st.one_of(texts(), _integers(), st.none(), st.lists(st.integers(), max_size=3),
                       st.sampled_from(["2024-01-01T00:00:00+05:00", "9999-12-31T23:59:59", "0001-01-01"]))
    forged = st.dictionaries(st.sampled_from(["t", "n", "f", "s", "j", "p"]), values, max_size=4).map(
        lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode())
    return st.one_of(texts(600), forged)


@st.composite
def list_jobs_requests(draw) -> js.ListJobsRequest:
    return js.ListJobsRequest(
        page_size=draw(st.one_of(st.integers(-5, 1100), st.integers(-2**31, 2**31 - 1))),
        page_token=draw(st.one_of(st.just(""), _forged_tokens())),
        states=draw(st.lists(st.one_of(st.integers(0, 9), st.integers(-2**31, 2**31 - 1)), max_size=4)),
        labels=draw(st.dictionaries(texts(40), texts(80), max_size=3)),
        view=draw(st.one_of(st.integers(0, 3), st.integers(-2**31, 2**31 - 1))))


@st.composite
def names(draw) -> str:
    return draw(st.one_of(texts(100), _NAMES.map(lambda n: f"jobs/{n}")))


# -- the properties ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the calls returned, by method and code (the benchmark prints it)."""

    codes: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, method: str, code: grpc.StatusCode) -> None:
        by_code = self.codes.setdefault(method, {})
        by_code[code.name] = by_code.get(code.name, 0) + 1


class ApiFuzzer:
    """Calls a control plane's JobService and SweepService and checks each answer against the properties."""

    def __init__(self, plane: ControlPlane, token: str, tally: Tally | None = None):
        self.plane = plane
        self.channel = grpc.insecure_channel(plane.grpc_address, options=[("grpc.max_receive_message_length", -1)])
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.sweeps = sweep_service_pb2_grpc.SweepServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")]
        self.tally = tally or Tally()

    def close(self) -> None:
        self.channel.close()

    def create_job(self, spec: job_pb2.JobSpec) -> None:
        self._creates("CreateJob", Job, lambda: self.jobs.CreateJob(js.CreateJobRequest(spec=spec),
                                                                    metadata=self.metadata))

    def create_sweep(self, spec: sweep_pb2.SweepSpec) -> None:
        self._creates("CreateSweep", Sweep, lambda: self.sweeps.CreateSweep(ss.CreateSweepRequest(spec=spec),
                                                                            metadata=self.metadata))

    def list_jobs(self, request: js.ListJobsRequest) -> None:
        self._call("ListJobs", lambda: self.jobs.ListJobs(request, metadata=self.metadata))

    def get_job(self, name: str) -> None:
        self._call("GetJob", lambda: self.jobs.GetJob(js.GetJobRequest(name=name), metadata=self.metadata))

    def _creates(self, method: str, model, call: Callable) -> None:
        before = self._rows(model)
        code = self._call(method, call)
        after = self._rows(model)
        expected = before + 1 if code == grpc.StatusCode.OK else before
        assert after == expected, f"{method} answered {code.name}, and the rows went from {before} to {after}"

    def _call(self, method: str, call: Callable) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as error:
            code = error.code()
            self.tally.add(method, code)
            assert code in EXPECTED_CODES, f"{method}: {code.name}: {error.details()}"
            assert len(error.details() or "") <= MAX_MESSAGE, f"{method}: a {len(error.details())}-character message"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                fields = _violation_fields(error)
                assert fields and all(fields), f"{method}: INVALID_ARGUMENT without a field: {error.details()}"
            return code
        self.tally.add(method, grpc.StatusCode.OK)
        return grpc.StatusCode.OK

    def _rows(self, model) -> int:
        with self.plane.db.read() as session:
            return session.scalar(select(func.count()).select_from(model))


def _violation_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None and status.details, "INVALID_ARGUMENT without a google.rpc.BadRequest"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]
