"""The Kubernetes objects of one attempt, as plain dicts (pure functions of a LaunchRequest and settings).

Per attempt, all named alike (`object_name`):
- an Indexed Job: one pod per node of `ranks_per_pod` ranks (default 1), completion index = node rank, so pod
  i runs ranks i*n .. i*n+n-1 (one rank: the trainer itself; several: torchrun starts them); backoffLimit 0
  (the control plane restarts the whole gang, never the Job one pod), created suspended so its Service and
  Secret exist first;
- a headless Service whose name is every pod's subdomain, so rank 0 is `<name>-0.<name>` before it starts
  (what JobSet does, with nothing to install on the cluster);
- a Secret with the attempt's credential and the spec the ranks run (ROUNDHOUSE_SPEC_JSON);
- a NetworkPolicy letting the attempt's pods accept connections from each other (k8s/deploy/networkpolicy.yaml
  lets them accept the control plane's and nothing else, and reach only the control plane, DNS and ranks).
The Service, Secret and NetworkPolicy are owned by the Job: deleting the Job removes everything. A spec's
`kubernetes.env_from_secrets` become `secretKeyRef`s to Secrets of the namespace that the launcher never reads;
an attempt's own Secret (any job's) may not be one of them (`attempt_secret_problem`)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

from contract import job_dirs, rank_env
from contract.rank_env import RankEnv
from orchestrator.launcher import LaunchRequest

LABEL_JOB = "roundhouse.io/job"
LABEL_ATTEMPT = "roundhouse.io/attempt"
LABEL_RANK = "roundhouse.io/rank"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGED_BY = "roundhouse"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RANKS_PER_POD_ANNOTATION = "roundhouse.io/ranks-per-pod"
CONTAINER = "trainer"
MASTER_PORT = 29500
SECRET_TOKEN_KEY = "token"
SECRET_SPEC_KEY = "spec.json"
SECRET_CLIENT_KEY = "client.key"  # the ranks' TLS client key, with mutual TLS
# A pod name is "<job>-<index>-<5 random>" and its hostname "<job>-<index>", both DNS labels (63).
MAX_BASE_NAME = 50
# What `object_name` makes: "<job or its shortened form>-a<attempt>".
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?-a[0-9]+")


@dataclass(frozen=True)
class PodSettings:
    """What the control plane sets for every job (`roundhouse serve --launcher kubernetes ...`); a job's spec
    may override image and volume claim."""

    namespace: str = "default"
    image: str = "roundhouse/trainer:0.1.0"
    command: list[str] = field(default_factory=lambda: ["python", "-m", "trainers"])
    # Data and checkpoints: a ReadWriteMany claim mounted at `volume_path` (None: an emptyDir, for trials only).
    volume_claim: str | None = None
    volume_path: str = "/var/lib/roundhouse"
    service_account: str | None = None
    termination_grace_seconds: int = 30
    image_pull_policy: str = "IfNotPresent"
    finished_job_ttl_seconds: int = 7 * 24 * 3600
    # Ranks honour the test hooks of their spec (a control plane started for tests: `--allow-test-hooks`).
    allow_test_hooks: bool = False


def ranks_per_pod(request: LaunchRequest) -> int:
    """The spec's ranks per pod if it divides the attempt's world size (a reshaped attempt may be smaller),
    else the largest number that divides both."""
    return math.gcd(request.spec.kubernetes.ranks_per_pod, request.world_size)


def pod_count(request: LaunchRequest) -> int:
    return request.world_size // ranks_per_pod(request)


def object_name(job: str, attempt: int) -> str:
    """The Job, Service and Secret of an attempt; a long job name is shortened with a hash kept unique."""
    base = job if len(job) <= MAX_BASE_NAME else f"{job[:MAX_BASE_NAME - 7]}-{_digest(job, 6)}"
    return f"{base}-a{attempt}"


def attempt_secret_problem(secret_name: str) -> str | None:
    """Why a spec may not read `secret_name` (None: it may, as far as the launcher knows): a name of the form
    the launcher gives an attempt's Secret, which holds that attempt's rank credential (and TLS client key).
    Refused for every job, not only the spec's own: one job must not run with another's credential."""
    if _OBJECT_NAME.fullmatch(secret_name):
        return ("names like '<job>-a<attempt>' are the launcher's own Secrets (a job attempt's rank credential); "
                "a job may not read them")
    return None


def labels(job: str, attempt: int) -> dict[str, str]:
    return {LABEL_MANAGED: MANAGED_BY, LABEL_JOB: job, LABEL_ATTEMPT: str(attempt)}


def selector(job: str, attempt: int | None = None) -> str:
    """A labelSelector for `kubectl get pods -l ...` and the API."""
    out = f"{LABEL_JOB}={job}"
    return out if attempt is None else f"{out},{LABEL_ATTEMPT}={attempt}"


def jobs_root(settings: PodSettings) -> PurePosixPath:
    """Where the jobs' directories are on the shared volume (contract.job_dirs: <volume>/jobs/<job>/...)."""
    return PurePosixPath(settings.volume_path) / "jobs"


def data_root(settings: PodSettings) -> str:
    """The one place on the shared volume a spec's data.path may lead (contract.reach): <volume>/data."""
    return str(PurePosixPath(settings.volume_path) / "data")


def checkpoint_dir(request: LaunchRequest, settings: PodSettings) -> str:
    """<volume>/jobs/<job>/<checkpoint.directory or "checkpoints">: one per job, shared by all its attempts.
    The control plane cannot look inside the volume: the rank checks that no symlink leads it out."""
    return str(job_dirs.checkpoint_dir(job_dirs.job_dir(jobs_root(settings), request.job), request.spec.checkpoint))


def secret(request: LaunchRequest, settings: PodSettings) -> dict[str, Any]:
    name = object_name(request.job, request.attempt)
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels(request.job, request.attempt)},
        "type": "Opaque",
        "stringData": {SECRET_TOKEN_KEY: request.job_token, SECRET_SPEC_KEY: request.spec.model_dump_json(),
                       **({SECRET_CLIENT_KEY: request.tls.client_key} if request.tls and request.tls.client_key
                          else {})},
    }


def service(request: LaunchRequest, settings: PodSettings) -> dict[str, Any]:
    name = object_name(request.job, request.attempt)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels(request.job, request.attempt)},
        "spec": {
            "clusterIP": "None",  # headless: DNS names for the pods, no virtual IP
            "selector": {LABEL_JOB: request.job, LABEL_ATTEMPT: str(request.attempt)},
            # Rank 0 must be resolvable before it is ready: the others rendezvous while it starts.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def network_policy(request: LaunchRequest, settings: PodSettings) -> dict[str, Any]:
    """The attempt's pods accept connections from each other (rendezvous, gloo, NCCL: any port). With
    k8s/deploy/networkpolicy.yaml, which denies rank pods every other connection but the control plane's, a
    rank accepts none from another job's ranks. Alone (no deploy policy), it only limits what the attempt's pods
    accept: ranks never need to accept anything from elsewhere."""
    name = object_name(request.job, request.attempt)
    pods = {"matchLabels": {LABEL_JOB: request.job, LABEL_ATTEMPT: str(request.attempt)}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels(request.job, request.attempt)},
        "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": pods}]}]},
    }


def owned_by(manifest: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The manifest with an owner reference to the (created) Job, so that deleting the Job deletes it.
    No blockOwnerDeletion: setting it needs update on jobs/finalizers, more than the Role grants."""
    meta = job["metadata"]
    manifest["metadata"]["ownerReferences"] = [{
        "apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"], "controller": True}]
    return manifest


def job(request: LaunchRequest, settings: PodSettings) -> dict[str, Any]:
    spec = request.spec
    k8s = spec.kubernetes
    name = object_name(request.job, request.attempt)
    job_labels = labels(request.job, request.attempt)
    if k8s.queue:
        job_labels[KUEUE_QUEUE_LABEL] = k8s.queue
    pod_labels = labels(request.job, request.attempt)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,  # with the headless Service: <name>-<index>.<name> resolves to each pod
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(request, settings, name)],
        "volumes": _volumes(request, settings),
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    pod_spec["automountServiceAccountToken"] = False  # ranks talk to the control plane, not to the cluster
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    if k8s.priority_class:
        pod_spec["priorityClassName"] = k8s.priority_class
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": job_labels,
                     "annotations": {"roundhouse.io/job-uid": request.job_uid,
                                     "roundhouse.io/start-step": str(request.start_step)}},
        "spec": {
            "completionMode": "Indexed",
            "completions": pod_count(request),
            "parallelism": pod_count(request),
            "backoffLimit": 0,  # one failed pod fails the attempt: the reconciler restarts the gang
            "ttlSecondsAfterFinished": settings.finished_job_ttl_seconds,  # kept a while for `kubectl logs`
            # Created suspended: the launcher adds the Service and Secret, then resumes it (or Kueue admits it).
            "suspend": True,
            "template": {"metadata": {"labels": pod_labels,
                                      "annotations": {RANKS_PER_POD_ANNOTATION: str(ranks_per_pod(request))}},
                         "spec": pod_spec},
        },
    }


def _container(request: LaunchRequest, settings: PodSettings, name: str) -> dict[str, Any]:
    spec = request.spec
    per_pod = ranks_per_pod(request)
    resources: dict[str, str] = {}  # the spec's are per rank
    if spec.resources.cpu:
        resources["cpu"] = _times(spec.resources.cpu, per_pod)
    if spec.resources.memory:
        resources["memory"] = _times(spec.resources.memory, per_pod)
    if spec.resources.gpus:
        resources["nvidia.com/gpu"] = str(spec.resources.gpus * per_pod)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.kubernetes.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _command(request, settings),
        "env": _env(request, settings, name),
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
        "volumeMounts": [{"name": "work", "mountPath": settings.volume_path},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    if resources:
        container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    return container


def _env(request: LaunchRequest, settings: PodSettings, name: str) -> list[dict[str, Any]]:
    """The contract's variables (contract.rank_env) as the local launcher sets them, with the rank from the
    pod's completion index (or torchrun's, for several ranks a pod), rank 0's stable DNS name as the
    rendezvous, and the credential and spec from the attempt's Secret; then the spec's `env` and
    `kubernetes.env_from_secrets`, and the pod's minimum (HOME on the writable emptyDir, unbuffered output). Nothing else: the image's own environment."""
    one_rank = ranks_per_pod(request) == 1
    contract = RankEnv(
        world_size=request.world_size, local_rank=0, local_world_size=1, master_addr=f"{name}-0.{name}",
        master_port=MASTER_PORT, server=request.server_address, job=f"jobs/{request.job}", attempt=request.attempt,
        server_ca=request.tls and request.tls.server_ca, client_cert=request.tls and request.tls.client_cert,
        start_step=request.start_step, job_dir=str(job_dirs.job_dir(jobs_root(settings), request.job)),
        checkpoint_dir=checkpoint_dir(request, settings), data_roots=(data_root(settings),),
        test_hooks=settings.allow_test_hooks)
    # Set below from the Secret and the completion index, or by torchrun for each of a pod's ranks.
    leave_out = {rank_env.RANK, rank_env.JOB_TOKEN, rank_env.SPEC_JSON}
    if not one_rank:
        leave_out |= {rank_env.WORLD_SIZE, rank_env.LOCAL_RANK, rank_env.LOCAL_WORLD_SIZE}
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(request.spec.env.items())]
    # The spec's Secret references: the kubelet reads the values; they pass through neither Roundhouse nor the
    # attempt's Secret. A missing Secret or key keeps the container from starting (the launcher fails it).
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for k, ref in sorted(request.spec.kubernetes.env_from_secrets.items())]
    env += [{"name": rank_env.RANK if one_rank else "NODE_RANK", "valueFrom": index}]
    env += [{"name": k, "value": v} for k, v in contract.to_environ(leave_out=leave_out).items()]
    env += [
        {"name": rank_env.JOB_TOKEN, "valueFrom": {"secretKeyRef": {"name": name, "key": SECRET_TOKEN_KEY}}},
        {"name": rank_env.SPEC_JSON, "valueFrom": {"secretKeyRef": {"name": name, "key": SECRET_SPEC_KEY}}},
        # With mutual TLS, the ranks' client key: from the Secret too, never in the pod's spec.
        *([{"name": rank_env.CLIENT_KEY, "valueFrom": {"secretKeyRef": {"name": name, "key": SECRET_CLIENT_KEY}}}]
          if request.tls and request.tls.client_key else []),
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only: caches go to the emptyDir
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    return env


def _command(request: LaunchRequest, settings: PodSettings) -> list[str]:
    """The trainer itself for one rank per pod; for several, torchrun starting the same module once per rank
    (settings.command is "<python> -m trainers"; $(VAR) is expanded by the kubelet from the env above)."""
    per_pod = ranks_per_pod(request)
    if per_pod == 1:
        return list(settings.command)
    python, *trainer = settings.command
    return [python, "-m", "torch.distributed.run", f"--nnodes={pod_count(request)}",
            f"--nproc-per-node={per_pod}", "--node-rank=$(NODE_RANK)", "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)", "--max-restarts=0", *trainer]


def _times(quantity: str, count: int) -> str:
    """A Kubernetes quantity times `count` ("500m" x 2 = "1", "16Gi" x 2 = "32Gi")."""
    if count == 1:
        return quantity
    digits = quantity.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    suffix = quantity[len(digits):]
    value = Decimal(digits) * count
    return f"{value.normalize():f}{suffix}"


def _volumes(request: LaunchRequest, settings: PodSettings) -> list[dict[str, Any]]:
    claim = request.spec.kubernetes.volume_claim or settings.volume_claim
    work = ({"name": "work", "persistentVolumeClaim": {"claimName": claim}} if claim
            else {"name": "work", "emptyDir": {}})
    return [work, {"name": "tmp", "emptyDir": {}}]


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]
