"""The Kubernetes launcher against the API stand-in (tests/support/fake_kube.py) over HTTP, through the official client:
the objects of an attempt, idempotent launches, Kueue, the watch (resume from resourceVersion, re-list on
410, bookmarks, retries that say so in one line), pod phases to attempt phases, every failure reason and
which rank failed first however the pods are seen (a watch, a re-list, an adoption), lost nodes, launches
that cannot make progress, stop (through the watch, never beside a terminating pod) and logs. Every request
goes through RBAC with the shipped Role. No processes: the tests write pod statuses as a kubelet, the node
lifecycle controller or the taint manager would."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from kubernetes import client

from k8s import manifests
from k8s.launcher import KubernetesLauncher, KubernetesSettings
from k8s.manifests import PodSettings
from orchestrator.launcher import AttemptRef, LaunchRequest, LogsUnavailable, Phase
from orchestrator.launcher.logs import LogRange
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import Attempt, AttemptState, Job
from roundhouse.v1 import job_service_pb2 as js

from tests.support.fake_kube import FakeKube, now_iso, shipped_role
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


TOKEN = "test-token"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube(token=TOKEN, role=shipped_role())  # the launcher's requests as RBAC checks them
    fake.url = fake.start()
    yield fake
    fake.stop()


def make_launcher(kube: FakeKube, **settings) -> KubernetesLauncher:
    configuration = client.Configuration()
    configuration.host = kube.url
    configuration.api_key = {"authorization": f"Bearer {TOKEN}"}
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


def set_terminated(kube: FakeKube, pod: dict, code: int, reason: str = "Error", phase: str | None = None,
                   finished: str | None = None) -> None:
    kube.set_pod_status(NS, pod["metadata"]["name"], {
        "phase": phase or ("Succeeded" if code == 0 else "Failed"), "containerStatuses": [
            {"name": "trainer", "image": "registry.example/trainer:1", "ready": False, "restartCount": 0,
             "imageID": "", "state": {"terminated": {"exitCode": code, "reason": reason,
                                                     "finishedAt": finished or now_iso()}}}]})


def seconds_ago(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))


def status_becomes(launcher: KubernetesLauncher, ref: AttemptRef, phase: Phase, timeout: float = DEADLINE):
    return eventually(lambda: (s := launcher.status(ref)).phase is phase and s, timeout)


def launched(launcher: KubernetesLauncher, kube: FakeKube, **kwargs) -> AttemptRef:
    req = request(**kwargs)
    info = launcher.launch(req)
    return AttemptRef(req.job, req.attempt, info)


def test_launch_creates_an_indexed_job_with_its_service_and_secret_and_is_idempotent(kube, launcher):
    kube.priority_classes.add("training")  # the cluster's admission refuses one that does not exist
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
    assert sum(1 for method, _ in kube.requests if method == "POST") == creates + 4  # each answered 409
    # The 409 of the Secret is not followed by a read: the launcher never reads a Secret.
    assert not [path for method, path in kube.requests if method == "GET" and "/secrets" in path]
    policy = kube.get("networkpolicies", NS, "gpt-a1")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == info["uid"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"roundhouse.io/job": "gpt", "roundhouse.io/attempt": "1"}}


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


def kubelet_removes(kube: FakeKube, pod: dict) -> None:
    """What a kubelet does once it has stopped a deleted pod's container: the pod goes."""
    kube.delete("pods", NS, pod["metadata"]["name"], grace=0)


def pod_lists(kube: FakeKube) -> int:
    return sum(1 for method, path in kube.requests if method == "GET" and "/pods?" in path and "watch" not in path)


def test_stop_deletes_the_job_and_everything_it_owns(kube, launcher):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    for pod in pods.values():
        set_running(kube, pod)
    status_becomes(launcher, ref, Phase.RUNNING)
    launcher.stop(ref, grace_seconds=0)
    for kind in ("jobs", "services", "secrets", "networkpolicies"):
        assert kube.list(kind, NS)["items"] == []
    deletes = [path for method, path in kube.requests if method == "DELETE"]
    assert any("/jobs/gpt-a1" in d and "propagationPolicy=Background" in d for d in deletes)
    # Even "kill now" leaves each pod to its kubelet (grace 1 s): a force delete (0) would remove the pod while
    # its container still runs, and the next attempt could start beside it.
    assert all("gracePeriodSeconds=1" in d for d in deletes if "/pods/" in d)
    terminating = kube.pods(NS)
    assert len(terminating) == 2 and all(p["metadata"]["deletionGracePeriodSeconds"] == 1 for p in terminating)
    for pod in terminating:
        kubelet_removes(kube, pod)
    eventually(lambda: launcher.ranks_gone(ref))
    launcher.stop(ref, grace_seconds=0)  # idempotent: nothing left is fine


def test_ranks_are_gone_only_once_every_pod_is_and_waiting_costs_no_list(kube, launcher):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    for pod in pods.values():
        set_running(kube, pod)
    status_becomes(launcher, ref, Phase.RUNNING)
    launcher.stop(ref, grace_seconds=30)
    eventually(lambda: all("deletionTimestamp" in p["metadata"] for p in launcher.cache.objects["pods"].values()))
    lists = pod_lists(kube)
    for _ in range(20):  # a stopping gang is looked at every interval: the watch answers, not a LIST
        assert not launcher.ranks_gone(ref)
    assert pod_lists(kube) == lists
    launcher.stop(ref, grace_seconds=0)  # the grace is over: shortened to 1 s, not forced
    assert {p["metadata"]["deletionGracePeriodSeconds"] for p in kube.pods(NS)} == {1}
    kubelet_removes(kube, pods[0])
    time.sleep(0.3)
    assert not launcher.ranks_gone(ref)  # rank 1 still terminates: no new attempt may start beside it
    kubelet_removes(kube, pods[1])
    eventually(lambda: launcher.ranks_gone(ref))
    assert pod_lists(kube) == lists + 1  # the one listing that confirms what the watch showed


def test_the_pods_of_a_job_deleted_by_hand_still_run_until_the_garbage_collector_and_their_kubelets_end_them(
        kube, launcher):
    """A cluster's garbage collector deletes a Job's pods behind the Job's deletion (paused here): the ranks run
    on meanwhile, and no new attempt may start beside them."""
    ref, pods = running_gang(kube, launcher)
    kube.pause_garbage_collector()
    kube.delete("jobs", NS, "gpt-a1", propagation="Background")
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "Preempted"
    eventually(lambda: "gpt-a1" not in launcher.cache.objects["jobs"])
    assert not launcher.ranks_gone(ref)  # the Job is gone, its pods are not
    kube.resume_garbage_collector()
    eventually(lambda: all("deletionTimestamp" in p["metadata"] for p in kube.pods(NS)))
    assert not launcher.ranks_gone(ref)  # terminating: their kubelets have yet to stop them
    for pod in pods.values():
        kubelet_removes(kube, pod)
    eventually(lambda: launcher.ranks_gone(ref))


def test_a_pod_whose_node_never_confirms_the_stop_is_removed_by_force_long_after_its_grace(kube, launcher):
    ref = launched(launcher, kube)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    for pod in pods.values():
        set_running(kube, pod)
    status_becomes(launcher, ref, Phase.RUNNING)
    launcher.stop(ref, grace_seconds=5)
    kubelet_removes(kube, pods[0])
    lost = pods[1]["metadata"]["name"]
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
    kube.patch("pods", NS, lost, {"metadata": {"deletionTimestamp": long_ago}})  # its node never answered
    eventually(lambda: launcher.cache.objects["pods"].get(lost, {}).get("metadata", {})
               .get("deletionTimestamp") == long_ago)
    launcher.stop(ref, grace_seconds=0)
    assert any(method == "DELETE" and f"/pods/{lost}" in path and "gracePeriodSeconds=0" in path
               for method, path in kube.requests)
    eventually(lambda: launcher.ranks_gone(ref))


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


# -- which pod failed first, whatever order the pods are seen in ------------------------------------------------


def running_gang(kube: FakeKube, launcher: KubernetesLauncher, ranks: int = 2) -> tuple[AttemptRef, dict[int, dict]]:
    ref = launched(launcher, kube, dp=ranks)
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == ranks and p)
    for pod in pods.values():
        set_running(kube, pod)
    status_becomes(launcher, ref, Phase.RUNNING)
    return ref, pods


def crash_then_the_job_controller_stops_the_rest(kube: FakeKube, pods: dict[int, dict], first: int,
                                                 same_second: bool) -> None:
    """Rank `first` crashes; the Job controller (the stand-in's) then deletes the other pods, whose ranks
    checkpoint on SIGTERM and exit 4; the kubelet removes them."""
    set_terminated(kube, pods[first], 17, finished=None if same_second else seconds_ago(5))
    for rank, pod in pods.items():
        if rank != first:
            assert "deletionTimestamp" in kube.get("pods", NS, pod["metadata"]["name"])["metadata"]
            set_terminated(kube, pod, 4)


def seen_by(kube: FakeKube, launcher: KubernetesLauncher, how: str, fault: Callable[[], None]) -> KubernetesLauncher:
    """Lets the launcher see `fault` through its watch, through a re-list after its watch's version was
    compacted away (a 410), or by adopting the attempt when it starts afterwards (a control plane restarted)."""
    if how == "watch":
        fault()
        return launcher
    if how == "relist":
        gone = kube.gone_sent
        with kube.changed:  # the watches cannot see these writes before their history is compacted
            fault()
            kube.expire_watches()
        eventually(lambda: kube.gone_sent > gone)
        return launcher
    launcher.close()
    fault()
    return make_launcher(kube)


@pytest.mark.parametrize("how", ["watch", "relist", "adoption"])
@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("same_second", [False, True], ids=["earlier", "same-second"])
def test_the_rank_that_failed_first_is_the_cause_however_the_pods_are_seen(kube, launcher, how, first,
                                                                           same_second):
    ref, pods = running_gang(kube, launcher)
    seeing = seen_by(kube, launcher, how, lambda: crash_then_the_job_controller_stops_the_rest(
        kube, pods, first, same_second))
    try:
        status = status_becomes(seeing, ref, Phase.FAILED)
        assert status.reason == "RankFailed", status.message
        assert status.message.startswith(f"rank {first} (pod gpt-a1-{first}-")
        assert status.message.endswith("exited with code 17")
    finally:
        if seeing is not launcher:
            seeing.close()


@pytest.mark.parametrize("how", ["watch", "relist", "adoption"])
def test_an_eviction_is_the_cause_of_the_crash_it_caused_in_the_same_second(kube, launcher, how):
    ref, pods = running_gang(kube, launcher)

    def evicted_then_peer_crashes():
        kube.evict(NS, pods[1]["metadata"]["name"])  # the Eviction API: DisruptionTarget, graceful delete
        set_terminated(kube, pods[0], 1)  # its peer lost the connection
        set_terminated(kube, pods[1], 4)  # the evicted rank checkpointed

    seeing = seen_by(kube, launcher, how, evicted_then_peer_crashes)
    try:
        status = status_becomes(seeing, ref, Phase.FAILED)
        assert status.reason == "Preempted", status.message
        assert status.message.startswith("rank 1 (pod gpt-a1-1-") and "EvictionByEvictionAPI" in status.message
    finally:
        if seeing is not launcher:
            seeing.close()


def test_a_job_reported_failed_before_its_pods_waits_for_the_pods_watch(kube, launcher):
    """The Jobs watch may run ahead of the pods watch: the launcher does not blame the ranks from the Job
    alone while the pods may still show what happened."""
    ref, pods = running_gang(kube, launcher)
    with launcher.cache.lock:  # as if the pods watch lagged: the Job's condition arrives first
        launcher.cache.objects["jobs"]["gpt-a1"]["status"]["conditions"] = [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}]
    assert launcher.status(ref).phase is Phase.PENDING
    set_terminated(kube, pods[1], 17)
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "RankFailed" and status.message.startswith("rank 1 (pod gpt-a1-1-")


# -- lost nodes --------------------------------------------------------------------------------------------------


def test_a_lost_node_is_a_preemption_when_its_peers_then_time_out(kube, launcher):
    """A cluster takes a lost node's pods away only after its tolerations (300 s) and never completes the
    delete; its peers' collective timeout (120 s) ends them first. The pod's Ready condition, which the node
    lifecycle controller turns False after its grace (40-50 s), dates the loss before their exits."""
    ref, pods = running_gang(kube, launcher)
    lost = pods[1]["metadata"]["name"]
    kube.lose_node(NS, lost)
    kube.mark_not_ready(NS, lost)
    time.sleep(0.3)
    assert launcher.status(ref).phase is Phase.RUNNING  # not ready alone fails nothing: a node may come back
    set_terminated(kube, pods[0], 1, finished=now_iso())  # the collective timed out (later, in a cluster)
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "Preempted", status.message
    assert status.message.startswith(f"rank 1 (pod {lost}) was lost with its node")
    # The Job controller deleted the lost pod; no kubelet will confirm it: still there, terminating.
    assert "deletionTimestamp" in kube.get("pods", NS, lost)["metadata"]


def test_the_ranks_collective_timeout_falls_between_a_lost_node_s_not_ready_and_the_hang_timeout():
    """The timings the lost-node classification relies on (docs/architecture.md): the node lifecycle
    controller marks a silent node's pods not ready after its grace (40 s; 50 s from 1.32), before the
    survivors' collective timeout ends them; the hang timeout and the pods' toleration (300 s) come later."""
    from trainers.parallel import PROCESS_GROUP_TIMEOUT  # here: it imports torch

    node_monitor_grace = 50
    collective = PROCESS_GROUP_TIMEOUT.total_seconds()
    hang = parse_spec({"name": "t"}).restart_policy.hang_timeout_seconds
    toleration = 300  # the API server's default for not-ready/unreachable (the stand-in gives pods the same)
    assert node_monitor_grace < collective < hang and collective < toleration


def test_a_pod_evicted_from_a_lost_node_is_a_preemption(kube, launcher):
    ref, pods = running_gang(kube, launcher)
    lost = pods[0]["metadata"]["name"]
    kube.lose_node(NS, lost)
    kube.evict_from_lost_node(NS, lost)  # the taint manager, once the toleration ran out
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "Preempted" and "DeletionByTaintManager" in status.message


def test_the_log_of_a_pod_whose_node_is_gone_is_unavailable_with_the_reason(kube, launcher):
    ref, pods = running_gang(kube, launcher)
    kube.lose_node(NS, pods[1]["metadata"]["name"])
    with pytest.raises(LogsUnavailable, match="rank 1 .* cannot be read now: .*no route to host"):
        list(launcher.logs(ref, 1, follow=False, attempt_ended=lambda: False))


# -- launches that cannot make progress ----------------------------------------------------------------------


def test_pods_refused_at_admission_fail_the_attempt_with_the_api_s_message(kube, launcher):
    ref = launched(launcher, kube, kubernetes={"priority_class": "no-such-class"})
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "PodsRefused" and not status.retryable
    assert status.message.startswith("the Kubernetes Job gpt-a1 cannot create its pods: Error creating: pods ")
    assert "no PriorityClass with name no-such-class was found" in status.message
    assert kube.pods(NS) == []


def test_pods_refused_by_a_quota_fail_the_attempt_after_the_timeout_with_a_budgeted_failure(kube):
    launcher = make_launcher(kube, unschedulable_timeout_seconds=1.0)  # a quota may free up meanwhile
    try:
        kube.pod_quota = 1
        ref = launched(launcher, kube)
        status = status_becomes(launcher, ref, Phase.FAILED)
        assert status.reason == "PodsRefused" and status.retryable
        assert status.message.startswith("the Kubernetes Job gpt-a1 created 1 of its 2 pods in ")
        assert "exceeded quota: pods" in status.message
    finally:
        launcher.close()


def test_a_job_that_does_not_create_its_pods_in_time_fails_the_attempt(kube):
    launcher = make_launcher(kube, unschedulable_timeout_seconds=0.5)
    try:
        kube.pod_quota, kube.events_kept = 0, False  # no pod is created, and the events saying why are gone
        ref = launched(launcher, kube)
        status = status_becomes(launcher, ref, Phase.FAILED)
        assert status.reason == "PodsRefused" and status.retryable
        assert status.message.startswith("the Kubernetes Job gpt-a1 created 0 of its 2 pods in ")
    finally:
        launcher.close()


# -- the watches ---------------------------------------------------------------------------------------------


def test_an_idle_watch_resumes_from_its_bookmarks(kube):
    kube.bookmark_seconds = 0.1
    launcher = make_launcher(kube, watch_seconds=1)
    try:
        launched(launcher, kube)
        eventually(lambda: [p["metadata"]["labels"].get(manifests.LABEL_RANK) for p in kube.pods(NS)] == ["0", "1"])
        kube.create("secrets", "elsewhere", {"metadata": {"name": "unrelated"}})  # versions move on
        version = kube.version
        eventually(lambda: kube.bookmarks_sent >= 2)
        eventually(lambda: any(f"resourceVersion={version}" in path and "/pods?" in path
                               for _, path in kube.requests))  # the next watch starts from the bookmark
    finally:
        launcher.close()


def test_a_watch_that_cannot_reach_the_api_server_says_so_in_one_line_and_backs_off(kube, caplog):
    launcher = make_launcher(kube)
    try:
        eventually(lambda: launcher.cache.synced["pods"].is_set())
        kube.stop()  # the API server goes away
        with caplog.at_level("WARNING", logger="k8s.launcher"):
            eventually(lambda: sum("retrying in 2 s" in r.getMessage() for r in caplog.records) >= 1)
        failures = [r for r in caplog.records if r.name == "k8s.launcher"]
        assert failures and all(r.exc_info is None for r in failures)  # no traceback per retry
        assert all("\n" not in r.getMessage() for r in failures)
        assert "retrying in 1 s" in failures[0].getMessage()
    finally:
        launcher.close()


def test_an_api_server_that_forbids_everything_until_its_rbac_is_ready_is_waited_for(kube, caplog):
    kube.rbac_ready = False  # a restarting API server answers 403 for a few seconds
    with caplog.at_level("WARNING", logger="k8s.launcher"):
        launcher = make_launcher(kube)
        try:
            eventually(lambda: any("403" in r.getMessage() and "forbidden" in r.getMessage() for r in caplog.records))
            kube.rbac_ready = True
            eventually(lambda: launcher.cache.synced["pods"].is_set() and launcher.cache.synced["jobs"].is_set())
            assert all(r.exc_info is None for r in caplog.records if r.name == "k8s.launcher")
        finally:
            launcher.close()


def test_a_log_that_cannot_be_reached_is_unavailable_over_grpc_with_the_reason(api_plane, client, monkeypatch):
    spec = parse_spec({"name": "far", "parallelism": {"dp": 2},
                       "training": {"global_batch_size": 4, "micro_batch_size": 2}})
    client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=client.metadata)
    with api_plane.db.session() as session:
        session.add(Attempt(job_name="far", number=1, state=AttemptState.RUNNING, tp=1, pp=1, dp=2, world_size=2,
                            start_step=0, launch_info={"name": "far-a1"}))

    def unreachable(ref, rank, follow, attempt_ended, where=None):
        raise LogsUnavailable(f"the log of rank {rank} cannot be read now: dial tcp: no route to host")
        yield  # a generator, as launchers' logs are

    monkeypatch.setattr(api_plane.launcher, "logs", unreachable)
    with pytest.raises(grpc.RpcError) as refused:
        list(client.jobs.StreamLogs(js.StreamLogsRequest(name="jobs/far", rank=1), metadata=client.metadata,
                                    timeout=DEADLINE))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert refused.value.details() == "the log of rank 1 cannot be read now: dial tcp: no route to host"


def test_secret_references_reach_the_rank_pods_as_secret_key_refs(kube, launcher):
    ref = launched(launcher, kube, kubernetes={"env_from_secrets": {
        "WANDB_API_KEY": {"name": "wandb", "key": "api-key"}}})
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    for pod in pods.values():
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    # The attempt's Secret names the reference (in the spec), never a value: the launcher never saw one.
    spec = json.loads(base64.b64decode(kube.get("secrets", NS, "gpt-a1")["data"]["spec.json"]))
    assert spec["kubernetes"]["env_from_secrets"] == {"WANDB_API_KEY": {"name": "wandb", "key": "api-key"}}
    assert launcher.status(ref).phase is Phase.PENDING


def test_a_missing_secret_fails_the_attempt_at_once_naming_it(kube, launcher):
    ref = launched(launcher, kube, kubernetes={"env_from_secrets": {"TOKEN": {"name": "missing", "key": "t"}}})
    pods = eventually(lambda: len(p := pods_by_rank(kube)) == 2 and p)
    # What a kubelet reports for a container whose secretKeyRef names no Secret (it would retry for ever).
    kube.set_pod_status(NS, pods[1]["metadata"]["name"], {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "image": "registry.example/trainer:1", "ready": False, "restartCount": 0, "imageID": "",
         "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "missing" not found'}}}]})
    status = status_becomes(launcher, ref, Phase.FAILED)
    assert status.reason == "ContainerConfigFailed" and not status.retryable
    assert 'secret "missing" not found' in status.message and "env_from_secrets" in status.message


def test_a_spec_may_not_read_the_secret_of_an_attempt(kube, launcher):
    for name in ("gpt-a1", "other-job-a3"):  # its own attempt's, or another job's: a rank credential
        spec = parse_spec({"name": "gpt", "kubernetes": {"env_from_secrets": {"T": {"name": name, "key": "token"}}}})
        [violation] = launcher.directory_violations(spec)
        assert violation.field == "kubernetes.env_from_secrets.T.name" and "launcher's own" in violation.description
    spec = parse_spec({"name": "gpt", "kubernetes": {"env_from_secrets": {"T": {"name": "wandb", "key": "k"}}}})
    assert launcher.directory_violations(spec) == []


def test_the_local_launcher_refuses_secret_references_naming_the_field(api_plane, client):
    spec = parse_spec({"name": "local", "kubernetes": {"env_from_secrets": {"T": {"name": "wandb", "key": "k"}}}})
    with pytest.raises(grpc.RpcError) as refused:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=client.metadata)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.kubernetes.env_from_secrets" in refused.value.details()
    assert "only read by the kubernetes launcher" in refused.value.details()
    with api_plane.db.read() as session:
        assert session.get(Job, "local") is None  # nothing written

