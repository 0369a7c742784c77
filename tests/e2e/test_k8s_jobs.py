"""Jobs run end to end through the Kubernetes launcher: a control plane in this process (`--launcher kubernetes`,
reaching the API stand-in through a kubeconfig), the simulated kubelet running every pod's trainer as a real
process (gloo, checkpoints on the shared "volume"), jobs submitted over gRPC.

A job trains to SUCCEEDED with its logs read from its pods (DeepSpeed's prebuilt op read-only to them, as
under readOnlyRootFilesystem); a pod deleted mid-run as a lost node would be
(no grace) leads to a new attempt that resumes from the newest committed checkpoint and succeeds; a cancel
deletes the Job, its pods and their processes; a control plane restarted mid-run adopts the running pods."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8s import manifests
from k8s.launcher import KubernetesSettings
from k8s.manifests import PodSettings
from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from orchestrator.process import wait_healthy
from orchestrator.controller import ReconcilerSettings
from orchestrator.server import ControlPlane, ServerSettings
from contract.spec import parse_spec, spec_to_proto
from roundhouse.v1 import job_pb2, job_service_pb2 as js
from trainers.checkpoint import committed_steps

from tests.conftest import Client, processes_of
from tests.support.fake_kube import FakeKube, shipped_role
from tests.support.fake_kubelet import FakeKubelet
from tests.e2e.test_local_jobs import TERMINAL, TINY_MODEL, events, wait_for
from tests.support.waiting import DEADLINE

pytestmark = pytest.mark.slow

NS = "ml"
CLAIM = "shared-data"


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: fake, user: {token: test}}]\n"
        f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NS}}}}}]\n")
    return path


class Cluster:
    """The API stand-in, a kubelet on this machine, and a control plane that launches onto them."""

    def __init__(self, tmp: Path):
        self.kube = FakeKube(token="test", role=shipped_role())  # the kubeconfig's token; RBAC from the Role
        url = self.kube.start()
        self.volume = tmp / "pvc"  # what the claim holds, as ReadWriteMany storage would
        # The image's environment: its prebuilt ops directory is this venv's, built once by `make install`
        # (the image's Dockerfile sets its own), never the user-wide ~/.cache that other clones rebuild.
        ops = Path(sys.prefix) / "torch_extensions"
        image_env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ops)}
        # Under readOnlyRootFilesystem the image's prebuilt ops cannot be written (issue 17).
        self.kubelet = FakeKubelet(self.kube, NS, tmp / "node", {CLAIM: self.volume}, image_env,
                                   image_read_only=(ops,))
        self.kubelet.start()
        self.settings = ServerSettings(
            home=tmp / "home", grpc_port=0, http_port=0, launcher="kubernetes", allow_test_hooks=True,
            kubeconfig=str(write_kubeconfig(tmp / "kubeconfig", url)),
            kubernetes=KubernetesSettings(pods=PodSettings(namespace=NS, image="roundhouse/trainer:test",
                                                           command=[sys.executable, "-m", "trainers"],
                                                           volume_claim=CLAIM)),
            reconciler=ReconcilerSettings(interval_seconds=0.2, restart_backoff_seconds=0.2, stop_grace_seconds=5))
        self.control = ControlPlane(self.settings)
        self.control.start()
        self.client = Client(self.control.grpc_address, token_file(tmp / "home").read_text().strip())

    def restart_control_plane(self) -> None:
        """A new control plane on the same database and gRPC port; the pods run on meanwhile."""
        self.control.stop()
        self.settings.grpc_port = self.control.grpc_port
        self.control = ControlPlane(self.settings)
        self.control.start()

    def submit(self, name: str, steps: int, env: dict | None = None, ranks_per_pod: int = 1) -> str:
        spec = parse_spec({"name": name, "model": TINY_MODEL, "parallelism": {"dp": 2},
                           "training": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2,
                                        "warmup_steps": 0},
                           "checkpoint": {"interval": 2}, "restart_policy": {"max_restarts": 0},
                           "kubernetes": {"ranks_per_pod": ranks_per_pod}, "env": env or {}})
        self.client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=self.client.metadata)
        return f"jobs/{name}"

    def close(self) -> None:
        self.client.close()
        self.control.stop()
        self.kubelet.stop()
        self.kube.stop()


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def test_a_job_trains_to_succeeded_as_pods(cluster):
    ops = Path(sys.prefix) / "torch_extensions"
    before = {str(p): p.stat().st_mtime_ns for p in ops.rglob("*")}
    job = cluster.submit("k8s-ok", steps=4)
    done = wait_for(cluster.client, job, lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert [a.state for a in done.attempts] == [job_pb2.ATTEMPT_STATE_SUCCEEDED]
    pods = cluster.kube.pods(NS, "roundhouse.io/job=k8s-ok,roundhouse.io/rank=1")  # `kubectl get pods -l`
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Succeeded"
    log = "".join(c.text for c in cluster.client.jobs.StreamLogs(js.StreamLogsRequest(name=job, rank=0),
                                                                  metadata=cluster.client.metadata, timeout=DEADLINE))
    assert "step 4/4" in log
    assert committed_steps(cluster.volume / "jobs" / "k8s-ok" / "checkpoints")[0] == 4
    if cluster.kubelet.read_only_enforced:  # the ranks loaded the image's prebuilt op without writing
        assert {str(p): p.stat().st_mtime_ns for p in ops.rglob("*")} == before


def test_a_pod_of_two_ranks_trains_them_under_torchrun(cluster):
    job = cluster.submit("k8s-node", steps=4, ranks_per_pod=2)
    done = wait_for(cluster.client, job, lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    [pod] = cluster.kube.pods(NS, "roundhouse.io/job=k8s-node")  # one pod for both ranks
    assert pod["status"]["phase"] == "Succeeded"
    log = "".join(c.text for c in cluster.client.jobs.StreamLogs(js.StreamLogsRequest(name=job, rank=1),
                                                                  metadata=cluster.client.metadata, timeout=DEADLINE))
    assert "layout tp=1 pp=1 dp=2" in log and "step 4/4" in log  # rank 1's log is its pod's: both ranks
    assert committed_steps(cluster.volume / "jobs" / "k8s-node" / "checkpoints")[0] == 4


def test_a_pod_lost_mid_run_restarts_the_job_from_its_newest_checkpoint(cluster):
    job = cluster.submit("k8s-lost", steps=16, env={"RH_TEST_STEP_SLEEP": "0.2"})
    wait_for(cluster.client, job, lambda j: j.checkpoint_step >= 4, timeout=DEADLINE)
    victim = cluster.kube.pods(NS, f"{manifests.selector('k8s-lost', 1)},{manifests.LABEL_RANK}=1")[0]
    cluster.kube.delete("pods", NS, victim["metadata"]["name"], grace=0)  # its node is gone: no SIGTERM

    done = wait_for(cluster.client, job, lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert len(done.attempts) == 2 and done.preemption_count == 1 and done.restart_count == 0
    assert done.attempts[0].end_reason.startswith("rank 1 (pod k8s-lost-a1-1-")
    assert done.attempts[1].start_step >= 4  # the newest committed checkpoint when the pod was lost
    preempted = [e for e in events(cluster.client, job) if e.reason == "Preempted"]
    assert len(preempted) == 1 and "was deleted (a lost node" in preempted[0].message
    assert cluster.kube.list("jobs", NS, "roundhouse.io/job=k8s-lost,roundhouse.io/attempt=1")["items"] == []


def test_cancel_deletes_the_job_and_stops_every_rank(cluster):
    job = cluster.submit("k8s-cancel", steps=1000, env={"RH_TEST_STEP_SLEEP": "0.2"})
    wait_for(cluster.client, job, lambda j: j.state == job_pb2.JOB_STATE_RUNNING and j.current_step >= 1,
             timeout=DEADLINE)
    cluster.client.jobs.CancelJob(js.CancelJobRequest(name=job), metadata=cluster.client.metadata)
    done = wait_for(cluster.client, job, lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert done.state == job_pb2.JOB_STATE_CANCELLED
    assert cluster.kube.list("jobs", NS, "roundhouse.io/job=k8s-cancel")["items"] == []
    assert cluster.kube.pods(NS, "roundhouse.io/job=k8s-cancel") == []
    for kind in ("services", "secrets"):  # owned by the Job: collected with it
        assert cluster.kube.list(kind, NS, "roundhouse.io/job=k8s-cancel")["items"] == []
    assert processes_of("k8s-cancel") == []


def test_roundhouse_serve_with_the_kubernetes_launcher_watches_its_namespace(tmp_path):
    kube = FakeKube()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube.start())
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--launcher", "kubernetes", "--namespace", NS,
         "--kubeconfig", str(kubeconfig), "--image", "registry.example/trainer:1", "--home", str(tmp_path / "home"),
         "--grpc-port", str(port), "--http-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=DEADLINE, process=server)
        deadline = time.monotonic() + DEADLINE
        watched = lambda: {path.split("?")[0] for _, path in kube.requests if "watch=" in path}  # noqa: E731
        while len(watched()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watched() == {f"/api/v1/namespaces/{NS}/pods", f"/apis/batch/v1/namespaces/{NS}/jobs"}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=DEADLINE)
        kube.stop()


def test_a_restarted_control_plane_adopts_the_running_pods(cluster):
    job = cluster.submit("k8s-adopt", steps=12, env={"RH_TEST_STEP_SLEEP": "0.2"})
    wait_for(cluster.client, job, lambda j: j.state == job_pb2.JOB_STATE_RUNNING and j.current_step >= 2,
             timeout=DEADLINE)
    pods = {p["metadata"]["uid"] for p in cluster.kube.pods(NS, "roundhouse.io/job=k8s-adopt")}
    cluster.restart_control_plane()
    done = wait_for(cluster.client, job, lambda j: j.state in TERMINAL, timeout=DEADLINE)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.state_message
    assert len(done.attempts) == 1  # adopted by what launch returned, not launched again
    assert {p["metadata"]["uid"] for p in cluster.kube.pods(NS, "roundhouse.io/job=k8s-adopt")} == pods
