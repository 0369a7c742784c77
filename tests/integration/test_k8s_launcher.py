"""The Kubernetes launcher against the API stand-in (tests/support/fake_kube.py) over HTTP, through the official client:
the objects of an attempt, idempotent launches, Kueue, the watch (resume from resourceVersion, re-list on
410), pod phases to attempt phases, every failure reason, stop and logs. No processes: the tests write pod
statuses as a kubelet or the cluster would."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client

from k8s import manifests
from k8s.launcher import KubernetesLauncher, KubernetesSettings
from k8s.manifests import PodSettings
from orchestrator.launcher import AttemptRef, LaunchRequest, Phase
from orchestrator.launcher.logs import LogRange
from contract.spec import parse_spec

from tests.support.fake_kube import FakeKube, now_iso
from tests.support.waiting import DEADLINE

NS = "training"


def request(name: str = "gpt", attempt: int = 1, dp: int = 2, **sections) -> LaunchRequest:
    spec = parse_spec({"name": name, "parallelism": {"dp": dp},
                       "training": {"global_batch_size": 4, "micro_batch_size": 2}, **sections})
    return LaunchRequest(job=name, job_uid="uid-1", attempt=attempt, spec=spec, tp=1, pp=1, dp=dp, start_step=6,
                         job_token="secret-token", server_address="roundhouse.ops.svc:50051")


def eventually(check: Callable[[], object], timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, "never happened"
            return value
        time.sleep(0.05)


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube()
    fake.url = fake.start()
    yield fake
    fake.stop()


def make_launcher(kube: FakeKube, **settings) -> KubernetesLauncher:
    configuration = client.Configuration()
    configuration.host = kube.url
    defaults = {"pods": PodSettings(namespace=NS, image="registry.example/trainer:1", volume_claim="shared"),
                "unschedulable_timeout_seconds": 30.0}
    return KubernetesLauncher(client.ApiClient(configuration), KubernetesSettings(**{**defaults, **settings}))


@pytest.fixture
def launcher(kube) -> Iterator[KubernetesLauncher]:
    launcher = make_launcher(kube)
    yield launcher
    launcher.close()


def pods_by_rank(kube: FakeKube, job: str = "gpt", attempt: int = 1) -> dict[int, dict]:
    return {int(p["metadata"]["annotations"][manifests.COMPLETION_INDEX_ANNOTATION]): p
            for p in kube.pods(NS, manifests.selector(job, attempt))}


def set_running(kube: FakeKube, pod: dict) -> None:
    kube.set_pod_status(NS, pod["metadata"]["name"], {"phase": "Running", "containerStatuses": [
        {"name": "trainer", "image": "registry.example/trainer:1", "ready": True, "restartCount": 0,
         "imageID": "", "state": {"running": {"startedAt": now_iso()}}}]})


def set_terminated(kube: FakeKube, pod: dict, code: int, reason: str = "Error", phase: str | None = None) -> None:
    kube.set_pod_status(NS, pod["metadata"]["name"], {
        "phase": phase or ("Succeeded" if code == 0 else "Failed"), "containerStatuses": [
            {"name": "trainer", "image": "registry.example/trainer:1", "ready": False, "restartCount": 0,
             "imageID": "", "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": now_iso()}}}]})


def status_becomes(launcher: KubernetesLauncher, ref: AttemptRef, phase: Phase, timeout: float = DEADLINE):
    return eventually(lambda: (s := launcher.status(ref)).phase is phase and s, timeout)


def launched(launcher: KubernetesLauncher, kube: FakeKube, **kwargs) -> AttemptRef:
    req = request(**kwargs)
    info = launcher.launch(req)
    return AttemptRef(req.job, req.attempt, info)


def test_launch_creates_an_indexed_job_with_its_service_and_secret_and_is_idempotent(kube, launcher):
    req = request(resources={"cpu": "2", "memory": "4Gi", "gpus": 1},
                  kubernetes={"node_selector": {"pool": "gpu"}, "priority_class": "training",
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    info = launcher.launch(req)
    assert info == {"namespace": NS, "name": "gpt-a1", "uid": kube.get("jobs", NS, "gpt-a1")["metadata"]["uid"],
                    "world_size": 2, "pods": 2}
    job = kube.get("jobs", NS, "gpt-a1")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["suspend"] is False and job["spec"]["backoffLimit"] == 0
    for kind in ("services", "secrets"):  # owned by the Job: deleting it deletes them
        owner = kube.get(kind, NS, "gpt-a1")["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"]) == ("Job", info["uid"])
    assert kube.get("services", NS, "gpt-a1")["spec"]["clusterIP"] == "None"
    secret = kube.get("secrets", NS, "gpt-a1")["data"]
    assert base64.b64decode(secret["token"]).decode() == "secret-token"
    assert json.loads(base64.b64decode(secret["spec.json"]))["parallelism"]["dp"] == 2

    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    pod = pods[1]
    assert pod["spec"]["hostname"] == "gpt-a1-1" and pod["spec"]["subdomain"] == "gpt-a1"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"} and pod["spec"]["priorityClassName"] == "training"
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/trainer:1"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == "gpt-a1-0.gpt-a1" and env["WORLD_SIZE"]["value"] == "2"
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["ROUNDHOUSE_JOB_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "gpt-a1", "key": "token"}
    assert env["ROUNDHOUSE_CHECKPOINT_DIR"]["value"] == "/var/lib/roundhouse/jobs/gpt/checkpoints"
    assert env["ROUNDHOUSE_SERVER"]["value"] == "roundhouse.ops.svc:50051"
    # The launcher labels each pod with its rank, for `kubectl get pods -l roundhouse.io/rank=1`.
    eventually(lambda: {p["metadata"]["labels"].get(manifests.LABEL_RANK)
                        for p in kube.pods(NS, "roundhouse.io/job=gpt")} == {"0", "1"})

    # Launched again (the reconciler is level-triggered; a control plane restarted mid-launch): same objects.
    creates = sum(1 for method, _ in kube.requests if method == "POST")
    assert launcher.launch(req) == info
    assert len(kube.pods(NS, manifests.selector("gpt", 1))) == 2
    assert sum(1 for method, _ in kube.requests if method == "POST") == creates + 3  # each answered 409


def test_a_kueue_queue_leaves_the_job_suspended_for_kueue_to_admit(kube, launcher):
    ref = launched(launcher, kube, kubernetes={"queue": "team-a"})
    job = kube.get("jobs", NS, "gpt-a1")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True and kube.pods(NS) == []
    assert launcher.status(ref).phase is Phase.PENDING
    kube.patch("jobs", NS, "gpt-a1", {"spec": {"suspend": False}})  # what Kueue does on admission
    eventually(lambda: len(kube.pods(NS)) == 2)


def test_status_follows_the_pods_from_pending_to_running_to_succeeded(kube, launcher):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    assert launcher.status(ref).phase is Phase.PENDING
    set_running(kube, pods[0])
    time.sleep(0.2)
    assert launcher.status(ref).phase is Phase.PENDING  # a gang runs only once every rank does
    set_running(kube, pods[1])
    status_becomes(launcher, ref, Phase.RUNNING)
    set_terminated(kube, pods[0], 0, "Completed")
    set_terminated(kube, pods[1], 0, "Completed")
    status_becomes(launcher, ref, Phase.SUCCEEDED)
    assert any(c["type"] == "Complete" for c in kube.get("jobs", NS, "gpt-a1")["status"]["conditions"])


def _crash(kube, pods):
    set_terminated(kube, pods[1], 17)


def _oom(kube, pods):
    set_terminated(kube, pods[1], 137, "OOMKilled")


def _sigterm(kube, pods):
    set_terminated(kube, pods[1], 4)


def _evicted(kube, pods):
    kube.set_pod_status(NS, pods[1]["metadata"]["name"], {
        "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
        "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                        "lastTransitionTime": now_iso()}]})


def _node_lost(kube, pods):
    kube.delete("pods", NS, pods[1]["metadata"]["name"], grace=0)


def _then_the_others_fail(kube, pods):
    """After its peer is gone, rank 0 fails too (gloo loses the connection): not the cause."""
    time.sleep(0.3)
    if kube.get("pods", NS, pods[0]["metadata"]["name"])["status"]["phase"] == "Running":
        set_terminated(kube, pods[0], 1)


@pytest.mark.parametrize("fault, reason, message", [
    (_crash, "RankFailed", "rank 1 (pod gpt-a1-1-*) exited with code 17"),
    (_oom, "OOMKilled", "rank 1 (pod gpt-a1-1-*) ran out of memory (OOMKilled, exit code 137, memory limit 1Gi)"),
    (_sigterm, "Preempted", "rank 1 (pod gpt-a1-1-*) was preempted (exit code 4)"),
    (_evicted, "Preempted", "rank 1 (pod gpt-a1-1-*) was preempted: Evicted: The node was low on resource: memory."),
    (_node_lost, "Preempted", "rank 1 (pod gpt-a1-1-*) was deleted (a lost node, or by hand)"),
], ids=["crash", "oom", "sigterm", "evicted", "node-lost"])
def test_each_failure_is_told_apart_with_its_reason(kube, launcher, fault, reason, message):
    ref = launched(launcher, kube, resources={"memory": "1Gi"})
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    for pod in pods.values():
        set_running(kube, pod)
    status_becomes(launcher, ref, Phase.RUNNING)
    fault(kube, pods)
    _then_the_others_fail(kube, pods)
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == reason and status.retryable
    prefix, _, suffix = message.partition("*")
    assert status.message.startswith(prefix) and status.message.endswith(suffix), status.message


def test_an_image_that_cannot_be_pulled_fails_at_once_and_names_the_image(kube, launcher):
    ref = launched(launcher, kube, kubernetes={"image": "registry.example/trainer:typo"})
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    kube.set_pod_status(NS, pods[0]["metadata"]["name"], {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "image": "registry.example/trainer:typo", "ready": False, "restartCount": 0, "imageID": "",
         "state": {"waiting": {"reason": "ImagePullBackOff",
                               "message": 'Back-off pulling image "registry.example/trainer:typo"'}}}]})
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "ImagePullFailed" and not status.retryable
    assert "cannot pull image registry.example/trainer:typo" in status.message


def test_a_pod_unschedulable_for_longer_than_the_limit_fails_the_attempt(kube, launcher):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}
    kube.set_pod_status(NS, pods[1]["metadata"]["name"], {"phase": "Pending", "conditions": [
        {**unschedulable, "lastTransitionTime": now_iso()}]})
    time.sleep(0.3)
    assert launcher.status(ref).phase is Phase.PENDING  # 30 s allowed
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 45))
    kube.set_pod_status(NS, pods[1]["metadata"]["name"], {"phase": "Pending", "conditions": [
        {**unschedulable, "lastTransitionTime": long_ago}]})
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "Unschedulable" and status.retryable
    assert status.message.startswith("rank 1 (pod gpt-a1-1-") and "unschedulable for 4" in status.message
    assert "Insufficient nvidia.com/gpu" in status.message


def test_a_job_deleted_behind_our_back_is_a_preemption(kube, launcher):
    ref = launched(launcher, kube)
    eventually(lambda: len(kube.pods(NS)) == 2)
    kube.delete("jobs", NS, "gpt-a1")
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "Preempted"


def test_the_watch_resumes_from_its_resource_version_and_relists_when_it_is_gone(kube):
    launcher = make_launcher(kube, watch_seconds=1)
    try:
        ref = launched(launcher, kube)
        pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
        time.sleep(1.5)  # the first watches time out and are re-opened from the last version seen
        watches = [path for method, path in kube.requests if "watch=True" in path or "watch=true" in path]
        assert any("resourceVersion=" in w and "resourceVersion=0" not in w for w in watches[2:]), watches
        lists_before = sum(1 for _, p in kube.requests if "/pods?" in p and "watch" not in p)

        kube.patch("secrets", NS, "gpt-a1", {"metadata": {"labels": {"x": "y"}}})  # versions move on
        kube.expire_watches()  # the versions the watches hold are compacted away
        for pod in pods.values():
            set_running(kube, pod)
        status_becomes(launcher, ref, Phase.RUNNING)
        assert kube.gone_sent >= 1
        assert sum(1 for _, p in kube.requests if "/pods?" in p and "watch" not in p) > lists_before
    finally:
        launcher.close()


def test_stop_deletes_the_job_and_everything_it_owns(kube, launcher):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    for pod in pods.values():
        set_running(kube, pod)
    status_becomes(launcher, ref, Phase.RUNNING)
    launcher.stop(ref, grace_seconds=0)
    assert kube.pods(NS) == []
    for kind in ("jobs", "services", "secrets"):
        assert kube.list(kind, NS)["items"] == []
    deletes = [path for method, path in kube.requests if method == "DELETE"]
    assert any("/jobs/gpt-a1" in d and "propagationPolicy=Background" in d for d in deletes)
    assert all("gracePeriodSeconds=0" in d for d in deletes if "/pods/" in d)
    launcher.stop(ref, grace_seconds=0)  # idempotent: nothing left is fine


def test_logs_are_read_from_the_rank_s_pod(kube, launcher, tmp_path):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    log = tmp_path / "rank1.log"
    log.write_text("step 1 loss 5.5\nstep 2 loss 5.1\n")
    kube.pod_logs[(NS, pods[1]["metadata"]["name"])] = log
    set_running(kube, pods[1])
    eventually(lambda: (p := launcher._pod_of_rank(ref, 1)) and p["status"]["phase"] == "Running")
    reads = list(launcher.logs(ref, 1, follow=False, attempt_ended=lambda: False))
    assert b"".join(r.data for r in reads) == log.read_bytes() and reads[0].offset == 0
    # An offset is reached by skipping, a tail by a first read of the whole log.
    rest = launcher.logs(ref, 1, follow=False, attempt_ended=lambda: False, where=LogRange(offset=7))
    assert b"".join(r.data for r in rest) == log.read_bytes()[7:]
    last = list(launcher.logs(ref, 1, follow=False, attempt_ended=lambda: False, where=LogRange(tail_lines=1)))
    assert b"".join(r.data for r in last) == b"step 2 loss 5.1\n" and last[0].offset == len("step 1 loss 5.5\n")


def test_capacity_is_the_configured_most_ranks_or_none(kube):
    for most in (None, 4):
        launcher = make_launcher(kube, max_ranks=most)
        assert launcher.capacity() == most  # None: the cluster schedules; a Job waits for room
        launcher.close()
