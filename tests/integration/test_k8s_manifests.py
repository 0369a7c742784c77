"""Every Kubernetes object Roundhouse makes or ships is valid against the cluster's OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), from the oldest supported version to the newest;
and the control plane's Role allows exactly what the launcher does (checked on its requests to the stand-in)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from contract.rank_env import RankEnv
from k8s import manifests
from k8s.manifests import PodSettings
from orchestrator.launcher import AttemptRef, Phase, RankTls

from tests.support.fake_kube import FakeKube
from tests.integration.test_k8s_launcher import make_launcher, pods_by_rank, request, set_running, set_terminated
from tests.support.waiting import DEADLINE

DEPLOY = Path(__file__).parents[2] / "k8s" / "deploy"
VERSIONS = ["1.30", "1.37"]  # the oldest Kubernetes supported, and the newest schemas kubernetes-validate has


def validate(obj: dict[str, Any], where: str) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except ValidationError as exc:  # the message alone; the error's text repeats the whole schema
            pytest.fail(f"{where} is not a valid {obj.get('kind')} for Kubernetes {version}: "
                        f"{str(exc).split(chr(10))[0]} at {'.'.join(map(str, exc.path))}")


SPECS = {
    "cpu-defaults": {},
    "gpus-tolerations-kueue": {
        "resources": {"cpu": "8", "memory": "64Gi", "gpus": 8},
        "kubernetes": {"image": "registry.example.com/roundhouse/trainer:0.1.0-cu128", "volume_claim": "datasets",
                       "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                       {"key": "dedicated", "value": "training"}],
                       "priority_class": "training-high", "queue": "team-a"},
        "checkpoint": {"directory": "shared/ckpt", "interval": 100},
        "env": {"NCCL_DEBUG": "INFO"}},
    "long-name": {"name": "a-job-name-that-is-as-long-as-a-dns-label-may-be-0123456789abc"},
    "ranks-per-pod": {"resources": {"cpu": "500m", "memory": "16Gi", "gpus": 1}, "kubernetes": {"ranks_per_pod": 2}},
}


@pytest.mark.parametrize("sections", SPECS.values(), ids=SPECS.keys())
def test_the_objects_of_an_attempt_are_valid(sections):
    sections = dict(sections)
    req = request(name=sections.pop("name", "gpt"), attempt=12, dp=2, **sections)
    settings = PodSettings(namespace="ml", volume_claim="roundhouse-data", service_account="trainer")
    job = manifests.job(req, settings)
    owner = {"metadata": {"name": job["metadata"]["name"], "uid": "0b7a3b3c-2f38-4e0c-9d43-5a1c2d1c9f10"}}
    objects = [job, manifests.owned_by(manifests.service(req, settings), owner),
               manifests.owned_by(manifests.secret(req, settings), owner)]
    for obj in objects:
        validate(obj, f"the {obj['kind']} of {req.job}")
    name = job["metadata"]["name"]
    assert len(f"{name}-{req.world_size - 1}") <= 63  # the pods' hostnames are DNS labels
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)


def test_several_ranks_per_pod_run_under_torchrun_with_the_pods_resources_summed():
    req = request(dp=8, resources={"cpu": "500m", "memory": "16Gi", "gpus": 1}, kubernetes={"ranks_per_pod": 4},
                  training={"global_batch_size": 16, "micro_batch_size": 2})
    job = manifests.job(req, PodSettings(command=["python", "-m", "trainers"]))
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)  # 8 ranks, 4 a pod: 2 nodes
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"][manifests.RANKS_PER_POD_ANNOTATION] == "4"
    [container] = template["spec"]["containers"]
    assert container["command"] == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
                                    "--node-rank=$(NODE_RANK)", "--master-addr=$(MASTER_ADDR)",
                                    "--master-port=$(MASTER_PORT)", "--max-restarts=0", "-m", "trainers"]
    env = {e["name"]: e for e in container["env"]}
    assert "RANK" not in env and "LOCAL_RANK" not in env  # torchrun sets them for each rank
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
        f"['{manifests.COMPLETION_INDEX_ANNOTATION}']")
    assert container["resources"]["limits"] == {"cpu": "2000m", "memory": "64Gi", "nvidia.com/gpu": "4"}

    reshaped = request(dp=6, kubernetes={"ranks_per_pod": 4},  # 6 ranks after a reshape: 3 pods of 2
                       training={"global_batch_size": 12, "micro_batch_size": 2})
    assert (manifests.ranks_per_pod(reshaped), manifests.pod_count(reshaped)) == (2, 3)
    single = manifests.job(request(dp=2), PodSettings(command=["python", "-m", "trainers"]))
    assert single["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "trainers"]


def test_a_pods_environment_is_the_contract_the_specs_env_and_the_pods_minimum():
    req = request(dp=2, env={"NCCL_DEBUG": "INFO"}, checkpoint={"directory": "keep/ckpt"})
    [container] = manifests.job(req, PodSettings(volume_path="/vol"))["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert len(env) == len(container["env"])  # no name twice
    contract = set(RankEnv(spec_file="x", spec_json="x", server="x", run_dir="x", job_dir="x", checkpoint_dir="x",
                           data_roots=()).to_environ())
    assert set(env) - contract == {"NCCL_DEBUG", "HOME", "PYTHONUNBUFFERED"}
    assert env["ROUNDHOUSE_JOB_DIR"] == "/vol/jobs/gpt"
    assert env["ROUNDHOUSE_CHECKPOINT_DIR"] == "/vol/jobs/gpt/keep/ckpt"
    assert env["ROUNDHOUSE_DATA_ROOTS"] == "/vol/data" == manifests.data_root(PodSettings(volume_path="/vol"))
    assert env["ROUNDHOUSE_TEST_HOOKS"] == "0"
    [container] = manifests.job(req, PodSettings(allow_test_hooks=True))["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in container["env"]}["ROUNDHOUSE_TEST_HOOKS"] == "1"


def test_with_tls_pods_get_the_ca_and_client_certificate_and_the_key_only_through_the_secret():
    req = dataclasses.replace(request(), tls=RankTls("CA PEM", "CERT PEM", "KEY PEM"))
    [container] = manifests.job(req, PodSettings())["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["ROUNDHOUSE_SERVER_CA"] == "CA PEM" and env["ROUNDHOUSE_CLIENT_CERT"] == "CERT PEM"
    secret = manifests.secret(req, PodSettings())
    assert env["ROUNDHOUSE_CLIENT_KEY"] == {"secretKeyRef": {"name": secret["metadata"]["name"],
                                                             "key": manifests.SECRET_CLIENT_KEY}}
    assert secret["stringData"][manifests.SECRET_CLIENT_KEY] == "KEY PEM"
    assert "KEY PEM" not in str(manifests.job(req, PodSettings()))
    plain = {e["name"] for e in manifests.job(request(), PodSettings())["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not plain & {"ROUNDHOUSE_SERVER_CA", "ROUNDHOUSE_CLIENT_CERT", "ROUNDHOUSE_CLIENT_KEY"}


def deploy_objects() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / resource).read_text()):
            out.append((resource, doc))
    return out


def test_the_deploy_manifests_are_valid_and_all_in_the_kustomization():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    kinds = set()
    for resource, obj in deploy_objects():
        validate(obj, f"k8s/deploy/{resource}")
        kinds.add(obj["kind"])
    assert kinds == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret",
                     "PersistentVolumeClaim", "Deployment", "Service"}


def test_the_deployment_runs_the_kubernetes_launcher_restricted():
    deployment = next(obj for _, obj in deploy_objects() if obj["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["roundhouse", "serve"] and "--launcher=kubernetes" in container["args"]
    assert "--namespace=$(POD_NAMESPACE)" in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def _verb(method: str, path: str) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) that a request to the stand-in needs, as the API server's RBAC sees it."""
    match = re.match(r"^/(api/v1|apis/batch/v1)/namespaces/[^/]+/([a-z]+)(/[^/?]+)?(/log)?", path)
    group = "" if match.group(1) == "api/v1" else "batch"
    resource = match.group(2) + ("/log" if match.group(4) else "")
    named = bool(match.group(3))
    if method == "GET":
        verb = "get" if named else ("watch" if re.search(r"[?&]watch=(true|True|1)", path) else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete"}[method]
    return group, resource, verb


def test_the_role_allows_what_the_launcher_does_and_no_more():
    role = next(obj for _, obj in deploy_objects() if obj["kind"] == "Role")
    allowed = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    kube = FakeKube()
    kube.url = kube.start()
    launcher = make_launcher(kube)
    try:
        req = request()
        ref = AttemptRef(req.job, req.attempt, launcher.launch(req))
        launcher.launch(req)  # the second time reads what exists
        deadline = time.monotonic() + DEADLINE
        while len(pods := pods_by_rank(kube)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for pod in pods.values():
            set_running(kube, pod)
        while launcher.status(ref).phase is not Phase.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        list(launcher.logs(ref, 0, follow=False, attempt_ended=lambda: True))
        set_terminated(kube, pods[1], 1)
        while launcher.status(ref).phase is not Phase.FAILED and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.stop(ref, grace_seconds=0)
        launcher.ranks_gone(ref)
        # An attempt whose pods admission refuses: the launcher reads the Job's FailedCreate events.
        refused = request(attempt=2, kubernetes={"priority_class": "missing"})
        ref = AttemptRef(refused.job, refused.attempt, launcher.launch(refused))
        while launcher.status(ref).phase is not Phase.FAILED and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        launcher.close()
        kube.stop()
    used = {_verb(method, path) for method, path in kube.requests}
    assert used <= allowed, f"the Role lacks {used - allowed}"
    assert allowed <= used, f"the Role grants what the launcher never does: {allowed - used}"
