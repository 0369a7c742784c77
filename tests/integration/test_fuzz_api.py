"""Property-based fuzzing of CreateJob, CreateSweep, ListJobs and GetJob through the real gRPC server, on both
databases (the properties are in tests/support/fuzz.py; `python -m benchmarks.fuzz_api` runs 10,000 and more
cases). A few hundred cases here, derandomized so that CI runs the same ones every time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import pytest
from hypothesis import HealthCheck, given, settings

from orchestrator.config import token_file
from orchestrator.controller import ReconcilerSettings
from orchestrator.server import ControlPlane, ServerSettings
from tests.conftest import postgres_schema
from tests.support.fuzz import FUZZ_LIMITS, ApiFuzzer, job_specs, list_jobs_requests, names, sweep_specs

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzer(request, tmp_path_factory) -> Iterator[ApiFuzzer]:
    """One server per database for the whole module (hypothesis calls each test many times)."""
    home = tmp_path_factory.mktemp("fuzz") / "home"
    with postgres_schema() if request.param == "postgresql" else nullcontext() as schema_url:
        db_url = schema_url or f"sqlite:///{home.parent / 'roundhouse.db'}"
        plane = ControlPlane(ServerSettings(home=home, db_url=db_url, grpc_port=0, http_port=0, reconcile=False,
                                            max_ranks=16, limits=FUZZ_LIMITS, reconciler=ReconcilerSettings()))
        plane.start()
        fuzzer = ApiFuzzer(plane, token_file(home).read_text().strip())
        yield fuzzer
        fuzzer.close()
        plane.stop()


@FUZZ
@given(spec=job_specs())
def test_create_job_refuses_with_a_field_and_writes_nothing(fuzzer, spec):
    fuzzer.create_job(spec)


@FUZZ
@given(spec=sweep_specs())
def test_create_sweep_refuses_with_a_field_and_writes_nothing(fuzzer, spec):
    fuzzer.create_sweep(spec)


@FUZZ
@given(list_request=list_jobs_requests())
def test_list_jobs_refuses_bad_filters_tokens_and_views_with_a_field(fuzzer, list_request):
    fuzzer.list_jobs(list_request)


@settings(FUZZ, max_examples=30)
@given(name=names())
def test_get_job_answers_not_found_or_invalid_argument(fuzzer, name):
    fuzzer.get_job(name)
