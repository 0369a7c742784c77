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
    "secret-references": {"kubernetes": {"env_from_secrets": {
        "WANDB_API_KEY": {"name": "wandb", "key": "api-key"}, "HF_TOKEN": {"name": "hf.tokens", "key": "token_1"}}}},
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
               manifests.owned_by(manifests.secret(req, settings), owner),
               manifests.owned_by(manifests.network_policy(req, settings), owner)]
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
    assert kinds == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PersistentVolumeClaim",
                     "Deployment", "Service", "NetworkPolicy", "LimitRange"}
    # No credential ships: the database's Secret is created by hand (README), never from a file in git.
    assert not (DEPLOY / "secret.yaml").exists()


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
    match = re.match(r"^/(api/v1|apis/[a-z0-9.]+/v1)/namespaces/[^/]+/([a-z]+)(/[^/?]+)?(/log)?", path)
    group = "" if match.group(1) == "api/v1" else match.group(1).split("/")[1]
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
    # Secrets are written, never read: not the attempt's own after a 409, nor any other in the namespace.
    assert {verb for group, resource, verb in allowed if resource == "secrets"} == {"create"}
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A NetworkPolicy's podSelector (matchLabels, matchExpressions with Exists) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        assert expression["operator"] == "Exists", "only Exists is modelled here"
        if expression["key"] not in labels:
            return False
    return True


def _accepts_from(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    """Whether `policy` lets a pod with `labels` in the same namespace connect on `port` (TCP)."""
    for rule in policy["spec"].get("ingress") or []:
        ports = [p["port"] for p in rule.get("ports") or []]
        sources = rule.get("from")
        if (not ports or port in ports) and (sources is None or any(
                "namespaceSelector" not in peer and _selects(peer["podSelector"], labels) for peer in sources)):
            return True
    return False


def test_ranks_accept_only_their_own_attempt_and_the_control_plane_which_ranks_reach_on_grpc():
    policies = {obj["metadata"]["name"]: obj for _, obj in deploy_objects() if obj["kind"] == "NetworkPolicy"}
    ranks_policy, plane_policy = policies["roundhouse-ranks"], policies["roundhouse-control-plane"]
    settings = PodSettings(namespace="ml")
    rank = manifests.job(request(name="gpt"), settings)["spec"]["template"]["metadata"]["labels"]
    other_job = manifests.job(request(name="other"), settings)["spec"]["template"]["metadata"]["labels"]
    next_attempt = manifests.job(request(name="gpt", attempt=2), settings)["spec"]["template"]["metadata"]["labels"]
    deployment = next(obj for _, obj in deploy_objects() if obj["kind"] == "Deployment")
    plane = deployment["spec"]["template"]["metadata"]["labels"]
    attempt_policy = manifests.network_policy(request(name="gpt"), settings)

    assert _selects(ranks_policy["spec"]["podSelector"], rank) and not _selects(ranks_policy["spec"]["podSelector"],
                                                                                 plane)
    assert set(ranks_policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert _selects(attempt_policy["spec"]["podSelector"], rank)
    assert not _selects(attempt_policy["spec"]["podSelector"], other_job)
    # NetworkPolicies add up: a rank pod accepts what any policy selecting it allows.
    accepting_rank = [p for p in (ranks_policy, attempt_policy) if _selects(p["spec"]["podSelector"], rank)]
    def rank_accepts(source):
        return any(_accepts_from(p, source, manifests.MASTER_PORT) for p in accepting_rank)
    assert rank_accepts(rank) and rank_accepts(plane)
    assert not rank_accepts(other_job) and not rank_accepts(next_attempt) and not rank_accepts({})
    # Ranks reach the control plane's gRPC port (egress), and it accepts them there.
    egress_to_plane = [rule for rule in ranks_policy["spec"]["egress"]
                       if any(_selects(peer.get("podSelector", {"matchLabels": {"_": "none"}}), plane)
                              for peer in rule["to"])]
    assert [p["port"] for rule in egress_to_plane for p in rule["ports"]] == [50051]
    assert _selects(plane_policy["spec"]["podSelector"], plane) and _accepts_from(plane_policy, rank, 50051)
    assert not _accepts_from(plane_policy, rank, 5432)
    grpc_port = next(p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
                     if p["name"] == "grpc")
    assert grpc_port == 50051


def test_a_limit_range_gives_every_container_without_resources_requests_and_limits():
    [limit_range] = [obj for _, obj in deploy_objects() if obj["kind"] == "LimitRange"]
    [container] = limit_range["spec"]["limits"]
    assert container["type"] == "Container"
    assert set(container["defaultRequest"]) == set(container["default"]) == {"cpu", "memory"}
    unbounded = manifests.job(request(), PodSettings())["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in unbounded  # a spec without resources: the LimitRange's defaults apply


def test_secret_references_are_secret_key_refs_and_never_in_the_attempt_s_secret():
    req = request(env={"NCCL_DEBUG": "INFO"}, kubernetes={"env_from_secrets": {
        "WANDB_API_KEY": {"name": "wandb", "key": "api-key"}}})
    [container] = manifests.job(req, PodSettings())["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert len(env) == len(container["env"])
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    assert env["NCCL_DEBUG"]["value"] == "INFO"
    # The attempt's Secret holds the spec, which names the Secret and key, never a value.
    assert "api-key" in manifests.secret(req, PodSettings())["stringData"][manifests.SECRET_SPEC_KEY]


@pytest.mark.parametrize("name", ["gpt-a1", "gpt-a12", "x-a0"])
def test_an_attempt_s_own_secret_name_is_refused_as_a_reference(name):
    assert manifests.attempt_secret_problem(manifests.object_name("gpt", 1)) is not None
    assert manifests.attempt_secret_problem(manifests.object_name("a" * 63, 3)) is not None  # shortened names too
    assert manifests.attempt_secret_problem(name) is not None
    assert manifests.attempt_secret_problem("wandb") is None and manifests.attempt_secret_problem("team-a") is None
