"""The operator's limits (orchestrator/service/limits.py): what a spec may ask for, refused at CreateJob and
CreateSweep as INVALID_ARGUMENT naming the field and the limit; per-user quotas as RESOURCE_EXHAUSTED; nothing
written either way; default per-rank resources; the limits file and `roundhouse serve`'s flags; the local
launcher's default cap at the machine's cores."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import func, select

from contract.errors import SpecError
from contract.spec import parse_spec, spec_to_proto
from contract.sweep import parse_sweep, sweep_to_proto
from orchestrator.config import token_file
from orchestrator.controller import ReconcilerSettings
from orchestrator.launcher.registry import create_launcher
from orchestrator.server import ControlPlane, ServerSettings
from orchestrator.service.limits import DefaultResources, KubernetesLimits, Limits, load_limits, parse_limits, usage
from orchestrator.store import Job, JobState, Sweep
from roundhouse.v1 import job_service_pb2 as js, sweep_service_pb2 as ss, sweep_service_pb2_grpc

from tests.conftest import Client
from tests.integration.test_api import field_violations
from tests.integration.test_sweeps import sweep_data

TINY = {"model": {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32},
        "training": {"global_batch_size": 8, "micro_batch_size": 1}}


def job(name: str, dp: int = 1, **sections) -> dict:
    return {"name": name, **TINY, "parallelism": {"dp": dp}, **sections}


# -- the rules, without a server -------------------------------------------------------------------------------


@pytest.mark.parametrize(("limits", "spec", "field"), [
    (Limits(ranks_per_job=4), job("a", dp=8), "parallelism"),
    (Limits(active_ranks_per_user=4), job("a", dp=8), "parallelism"),
    (Limits(parameters=1000), job("a"), "model"),
    (Limits(gpus_per_rank=1), job("a", resources={"gpus": 2}), "resources.gpus"),
    (Limits(kubernetes=KubernetesLimits(images=["reg.example/ml/*"])), job("a", kubernetes={"image": "evil/x:1"}),
     "kubernetes.image"),
    (Limits(kubernetes=KubernetesLimits(images=[])), job("a", kubernetes={"image": "reg.example/ml/t:1"}),
     "kubernetes.image"),
    (Limits(kubernetes=KubernetesLimits(volume_claims=["data"])), job("a", kubernetes={"volume_claim": "home"}),
     "kubernetes.volume_claim"),
    (Limits(kubernetes=KubernetesLimits(priority_classes=["low"])), job("a", kubernetes={"priority_class": "high"}),
     "kubernetes.priority_class"),
    (Limits(kubernetes=KubernetesLimits(tolerations=["gpu"])),
     job("a", kubernetes={"tolerations": [{"operator": "Exists"}]}), "kubernetes.tolerations.0.key"),
    (Limits(kubernetes=KubernetesLimits(node_selectors=["pool=cpu", "zone"])),
     job("a", kubernetes={"node_selector": {"pool": "gpu"}}), "kubernetes.node_selector.pool"),
    (Limits(kubernetes=KubernetesLimits(secrets=["wandb"])),
     job("a", kubernetes={"env_from_secrets": {"DB_URL": {"name": "roundhouse-db", "key": "ROUNDHOUSE_DB_URL"}}}),
     "kubernetes.env_from_secrets.DB_URL.name"),
])
def test_a_spec_over_a_limit_is_refused_at_its_field_naming_the_limit(limits, spec, field):
    violations = limits.violations(parse_spec(spec))
    assert [v.field for v in violations] == [field]
    assert "this server" in violations[0].description


def test_a_spec_within_the_limits_passes():
    limits = Limits(ranks_per_job=8, parameters=10**9, gpus_per_rank=1, kubernetes=KubernetesLimits(
        images=["reg.example/ml/*", "exact:1"], volume_claims=["data"], tolerations=["gpu"],
        node_selectors=["pool=gpu", "zone"], priority_classes=["low"], secrets=["wandb"]))
    spec = parse_spec(job("a", dp=8, resources={"gpus": 1}, kubernetes={
        "image": "reg.example/ml/trainer:2", "volume_claim": "data", "priority_class": "low",
        "env_from_secrets": {"WANDB_API_KEY": {"name": "wandb", "key": "api-key"}},
        "tolerations": [{"key": "gpu", "operator": "Exists"}], "node_selector": {"pool": "gpu", "zone": "b"}}))
    assert limits.violations(spec) == []
    assert Limits().violations(spec) == []


def test_default_resources_fill_only_what_a_spec_leaves_unset():
    limits = parse_limits({"default_resources": {"cpu": "4", "memory": "16Gi"}})
    filled = limits.with_defaults(parse_spec(job("a", resources={"memory": "2Gi"})))
    assert (filled.resources.cpu, filled.resources.memory) == ("4", "2Gi")
    spec = parse_spec(job("b"))
    assert Limits().with_defaults(spec) is spec


def test_the_limits_file_is_read_strictly(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("ranks_per_job: 16\nactive_jobs_per_user: 4\nparameters: 2_000_000_000\n"
                    "kubernetes:\n  images: ['reg.example/ml/*']\n  node_selectors: [pool=gpu]\n"
                    "default_resources: {cpu: '8', memory: 64Gi}\n")
    limits = load_limits(str(path))
    assert (limits.ranks_per_job, limits.active_jobs_per_user, limits.parameters) == (16, 4, 2_000_000_000)
    assert limits.kubernetes.images == ["reg.example/ml/*"] and limits.default_resources.memory == "64Gi"
    for text, field in (("ranks_per_jobs: 1\n", "ranks_per_jobs"), ("ranks_per_job: 0\n", "ranks_per_job"),
                        ("ranks_per_job: '4'\n", "ranks_per_job"), ("ranks_per_job: 1\nranks_per_job: 2\n", ""),
                        ("kubernetes: {node_selectors: ['bad key']}\n", "kubernetes.node_selectors.0"),
                        ("default_resources: {cpu: lots}\n", "default_resources.cpu")):
        path.write_text(text)
        with pytest.raises(SpecError) as info:
            load_limits(str(path))
        assert field in [v.field for v in info.value.violations], (text, info.value)


def test_the_local_launcher_caps_at_the_machines_cores_by_default(tmp_path):
    assert create_launcher(ServerSettings(home=tmp_path)).capacity() == len(os.sched_getaffinity(0))
    assert create_launcher(ServerSettings(home=tmp_path, max_ranks=64)).capacity() == 64


def test_a_job_that_needs_more_ranks_than_the_server_ever_runs_is_refused(tmp_path):
    plane = ControlPlane(ServerSettings(home=tmp_path / "home", grpc_port=0, http_port=0, reconcile=False,
                                        max_ranks=4))
    plane.start()
    client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    try:
        error = refused(lambda: submit(client, job("big", dp=8)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(error) == ["spec.resources.min_ranks"] and "at most 4 at once" in error.details()
        submit(client, job("reshapes", dp=8, resources={"min_ranks": 4}))  # runs reshaped to 4 ranks
        assert rows(plane, Job) == 1
    finally:
        client.close()
        plane.stop()


# -- through the server ----------------------------------------------------------------------------------------


@pytest.fixture
def limited(db_url, tmp_path) -> Iterator[tuple[ControlPlane, Client]]:
    plane = ControlPlane(ServerSettings(
        home=tmp_path / "home", db_url=db_url, grpc_port=0, http_port=0, reconcile=False, max_ranks=16,
        reconciler=ReconcilerSettings(),
        limits=Limits(ranks_per_job=4, active_jobs_per_user=2, active_ranks_per_user=3,
                      default_resources=DefaultResources(cpu="2"))))
    plane.start()
    client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    yield plane, client
    client.close()
    plane.stop()


def rows(plane, model) -> int:
    with plane.db.read() as session:
        return session.scalar(select(func.count()).select_from(model))


def submit(client, spec: dict):
    return client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(parse_spec(spec))), metadata=client.metadata)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def quota_subjects(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    quota = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(quota)
    return [v.subject for v in quota.violations]


def end(plane, name: str) -> None:
    with plane.db.session() as session:
        session.get(Job, name).state = JobState.CANCELLED


def test_create_job_over_a_limit_is_invalid_argument_and_writes_nothing(limited):
    plane, client = limited
    error = refused(lambda: submit(client, job("wide", dp=8)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == ["spec.parallelism"] and "at most 4 (limit ranks_per_job)" in error.details()
    assert rows(plane, Job) == 0


def test_quotas_are_resource_exhausted_until_jobs_end(limited):
    plane, client = limited
    first = submit(client, job("one", dp=2))
    assert first.spec.resources.cpu == "2"  # the operator's default per-rank cpu
    error = refused(lambda: submit(client, job("two", dp=2)))  # 2 + 2 ranks > 3
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(error) == ["spec.parallelism"] and "active_ranks_per_user" in error.details()
    submit(client, job("two"))  # 2 + 1 ranks: fits; now 2 active jobs
    error = refused(lambda: submit(client, job("three")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and quota_subjects(error) == ["spec"]
    assert "active_jobs_per_user" in error.details()
    assert rows(plane, Job) == 2
    end(plane, "one")
    assert usage(plane.db, "admin") == (1, 1)
    submit(client, job("three"))
    assert rows(plane, Job) == 3


def test_concurrent_creates_of_one_user_never_pass_the_quota_together(limited):
    plane, client = limited
    outcomes: list[grpc.StatusCode] = []

    def create(i: int) -> None:
        try:
            submit(client, job(f"race-{i}"))
            outcomes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            outcomes.append(error.code())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.name for o in outcomes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 6
    assert rows(plane, Job) == 2


def test_create_sweep_is_held_to_the_limits_and_the_quota(limited):
    plane, client = limited
    stub = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
    wide = sweep_data(target={**sweep_data()["target"], "parallelism": {"dp": 8},
                              "training": {"steps": 40, "global_batch_size": 8, "micro_batch_size": 1}})
    spec, _ = parse_sweep(wide)
    error = refused(lambda: stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)),
                                             metadata=client.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(error) == ["spec.target.parallelism"]
    spec, _ = parse_sweep(sweep_data(max_parallel=2))
    submit(client, job("busy"))  # 1 active job + 2 trials at once > 2
    error = refused(lambda: stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)),
                                             metadata=client.metadata))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and quota_subjects(error) == ["spec.proxy"]
    assert rows(plane, Sweep) == 0
    end(plane, "busy")
    created = stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)), metadata=client.metadata)
    assert created.spec.proxy.resources.cpu == "2" and created.spec.target.resources.cpu == "2"
