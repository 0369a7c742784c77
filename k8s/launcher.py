"""Runs each attempt as an Indexed Job of pods (one per node of `ranks_per_pod` ranks) through the official
Kubernetes client.

Two watch threads (pods, Jobs) keep a cache of this control plane's objects in its namespace: each lists,
then watches from the list's resourceVersion, resumes from the last version it saw when a watch ends, and
re-lists when the server says the version is gone (410). `status()` reads the cache and maps pod phases and
container states to the attempt's phase and, for a failure, its reason:

    Preempted        a pod evicted or disrupted (DisruptionTarget), on a node that stopped reporting (its Ready
                     condition no longer True while its container still runs), deleted by someone else, or a
                     rank that exited 4 (SIGTERM, checkpointed): spends the preemption budget
    OOMKilled        a container killed for memory
    RankFailed       a container that exited non-zero (the code is in the message)
    ImagePullFailed  the image cannot be pulled (named in the message): not retryable, the job fails at once
    ContainerConfigFailed  a Secret or key of the spec's env_from_secrets is missing: not retryable
    PodsRefused      the Job cannot create its pods: admission refuses them (its FailedCreate event: an unknown
                     priority class, Pod Security, a LimitRange, a webhook), not retryable; or it has not
                     created them within `unschedulable_timeout_seconds` (a quota, which may free up
                     meanwhile: the event's message is given), retryable
    Unschedulable    a pod no node could take for `unschedulable_timeout_seconds`

Which pod failed first does not depend on the order the pods were seen in: each pod's failure is dated by the
API's own timestamps (a container's `finishedAt`, a DisruptionTarget's or a Ready condition's transition, a
deletion's request: `deletionTimestamp` less its grace), and the earliest is the cause. Timestamps are whole
seconds, so ties within one are broken by the order a watch delivered them (the API server's write order),
and between failures seen at once (a re-list, an adoption) by their kind: a disruption before a container's
own exit before a deletion without a stated cause (the Job controller deletes the rest of a failed gang in
the same second). A pod on a lost node is only a suspect: it is the cause if a rank then fails (its peers'
collective timeout), never by itself (a node may come back).

Nothing here must survive a restart: what `launch` returned names the objects, the cluster holds the rest."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from k8s import manifests
from k8s.manifests import PodSettings
from contract.spec import FieldViolation, JobSpec
from orchestrator.launcher import (PREEMPTED, PREEMPTED_EXIT_CODE, AttemptRef, AttemptStatus, LaunchRequest,
                                   LogsUnavailable, Phase)
from orchestrator.launcher.logs import LOG_READ_BYTES, LogRange, LogRead, tail_start

if TYPE_CHECKING:
    from orchestrator.server import ServerSettings

log = logging.getLogger(__name__)

# Pod status reasons a node or the cluster gives when it takes a pod away.
_PREEMPTION_REASONS = {"Evicted", "Preempting", "NodeLost", "NodeShutdown", "Shutdown", "Terminated",
                       "UnexpectedAdmissionError", "DeadlineExceeded"}
_IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
# Ties within one second, between failures seen at once (see the module's docstring).
_DISRUPTED, _EXITED, _DELETED = 0, 1, 2
# A Job reported failed before the pods watch showed why: how long to wait for the pods watch to catch up
# before taking the Job's own word.
JOB_FAILED_WAIT_SECONDS = 10.0
# How often a Job that lacks pods has its FailedCreate events looked up (a LIST), at most.
EVENTS_CHECK_SECONDS = 2.0
# A pod still there this long after its deletion's grace ended is on a node that cannot confirm (lost): it
# is removed by force, or a stop would never end.
FORCE_DELETE_AFTER_SECONDS = 30.0
# Watch retries back off from the first to the most, and say so in one line each.
WATCH_RETRY_SECONDS = (1.0, 30.0)


@dataclass(frozen=True)
class KubernetesSettings:
    pods: PodSettings = field(default_factory=PodSettings)
    # The most ranks to start at once (None: the cluster schedules; a Job waits for room).
    max_ranks: int | None = None
    # A pod no node can take, or a Job that has not created its pods, fails the attempt after this long.
    unschedulable_timeout_seconds: float = 300.0
    # A watch is re-opened (from the last version it saw) this often.
    watch_seconds: int = 60


@dataclass(frozen=True)
class _Failure:
    when: float  # when it happened, by the API's timestamps (whole seconds since the epoch)
    cause: int  # _DISRUPTED, _EXITED or _DELETED: orders failures of the same second seen at once
    reason: str
    message: str
    retryable: bool = True
    suspect: bool = False  # a lost node's pod: the cause only if a rank fails too


@dataclass(frozen=True)
class _Refusal:
    message: str  # the FailedCreate event's, the API server's words
    permanent: bool  # admission refuses every try (not a quota, not a passing error)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and (exc.status in (429, 500, 502, 503, 504) or exc.status == 0)


_retry = retry(retry=retry_if_exception(_is_transient), stop=stop_after_attempt(5),
               wait=wait_exponential(multiplier=0.2, max=5), reraise=True)


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Cache:
    """The objects the watches saw, by name, and the pods of each attempt that are gone (their last state)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"pods": {}, "jobs": {}}
        self.synced = {"pods": threading.Event(), "jobs": threading.Event()}
        # (job, attempt) -> pod name -> the last state of a pod removed before it succeeded.
        self.vanished: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        # pod uid -> when its failure was first seen (a count: a watch delivers the API server's write order;
        # everything one listing shows is seen at once).
        self.failure_seen: dict[str, int] = {}
        self.sightings = 0


class KubernetesLauncher:
    def __init__(self, api: client.ApiClient, settings: KubernetesSettings = KubernetesSettings()):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.settings = settings
        self.namespace = settings.pods.namespace
        # The one place on the shared volume a spec's data.path may lead, as the ranks see it.
        self.data_roots = (manifests.data_root(settings.pods),)
        self.cache = _Cache()
        self._stopping = threading.Event()
        self._stopped_attempts: set[tuple[str, int]] = set()  # deletions of ours are not preemptions
        self._jobs_deleted: set[tuple[str, int]] = set()  # attempts whose Job this launcher has deleted
        # (job, attempt) -> when its Job was first seen failed with no pod failure seen yet (monotonic).
        self._job_failed_unexplained: dict[tuple[str, int], float] = {}
        # (job, attempt) -> (when its events were last looked up (monotonic), the refusal found, if any).
        self._refusals: dict[tuple[str, int], tuple[float, _Refusal | None]] = {}
        self._open_watches: dict[str, Any] = {}  # kind -> its streaming response, closed by close()
        self._watches_lock = threading.Lock()
        # Told the job's name when one of its pods ends or disappears (see `subscribe`).
        self._notify: Callable[[str], None] | None = None
        self._threads = [threading.Thread(target=self._watch_loop, args=(kind,), name=f"k8s-watch-{kind}",
                                          daemon=True) for kind in ("pods", "jobs")]
        for thread in self._threads:
            thread.start()

    def directory_violations(self, spec: JobSpec) -> list[FieldViolation]:
        """The shared volume is not mounted here: the job's directories are checked by the ranks. What is
        checked: no Secret reference names an attempt's own Secret (a rank credential, see manifests)."""
        out = []
        for env_name, ref in spec.kubernetes.env_from_secrets.items():
            problem = manifests.attempt_secret_problem(ref.name)
            if problem:
                out.append(FieldViolation(f"kubernetes.env_from_secrets.{env_name}.name", problem))
        return out

    def close(self) -> None:
        with self._watches_lock:
            self._stopping.set()
            for response in self._open_watches.values():
                try:
                    response.shutdown()  # unblocks the thread reading it
                except Exception:
                    pass
        for thread in self._threads:
            thread.join(timeout=5)

    # -- Launcher protocol -------------------------------------------------------------------------------

    def subscribe(self, notify: Callable[[str], None]) -> None:
        self._notify = notify

    def capacity(self) -> int | None:
        return self.settings.max_ranks

    def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Creates the attempt's Job (suspended), its Secret, Service and NetworkPolicy owned by it, then resumes
        it (unless Kueue admits it). Each step finds what an earlier, interrupted call already made."""
        pods = self.settings.pods
        name = manifests.object_name(request.job, request.attempt)
        job = self._create_or_get("jobs", manifests.job(request, pods))
        labels = job["metadata"].get("labels") or {}
        if (labels.get(manifests.LABEL_JOB), labels.get(manifests.LABEL_ATTEMPT)) != (request.job,
                                                                                      str(request.attempt)):
            raise RuntimeError(f"a Kubernetes Job named {name} exists in namespace {self.namespace} "
                               "but does not belong to this attempt")
        self._create_secret(manifests.owned_by(manifests.secret(request, pods), job))
        self._create_or_get("services", manifests.owned_by(manifests.service(request, pods), job))
        self._create_only(self.networking.create_namespaced_network_policy,
                          manifests.owned_by(manifests.network_policy(request, pods), job))
        if job["spec"].get("suspend") and not request.spec.kubernetes.queue:
            self._call(self.batch.patch_namespaced_job, name, self.namespace, {"spec": {"suspend": False}})
        return {"namespace": self.namespace, "name": name, "uid": job["metadata"]["uid"],
                "world_size": request.world_size, "pods": manifests.pod_count(request)}

    def status(self, ref: AttemptRef) -> AttemptStatus:
        info = ref.launch_info
        if not info.get("name"):
            return AttemptStatus(Phase.PENDING)
        self._wait_synced()
        key = (ref.job, ref.attempt)
        with self.cache.lock:
            job = self.cache.objects["jobs"].get(info["name"])
            pods = [p for p in self.cache.objects["pods"].values() if _attempt_of(p) == key]
            gone = list(self.cache.vanished.get(key, {}).values())
            seen = dict(self.cache.failure_seen)
        if job is None or job["metadata"].get("uid") != info["uid"]:
            job = self._get_job(info["name"])  # the cache may lag a launch: ask before calling it gone
            if job is None or job["metadata"].get("uid") != info["uid"]:
                return AttemptStatus(Phase.FAILED, PREEMPTED,
                                     f"the Kubernetes Job {info['name']} was deleted while the attempt ran")
        cause = self._first_failure(key, pods + gone, seen)
        if cause is not None:
            self._job_failed_unexplained.pop(key, None)
            return _failed(cause)
        conditions = {c["type"]: c for c in job.get("status", {}).get("conditions") or []
                      if c.get("status") == "True"}
        if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
            return AttemptStatus(Phase.SUCCEEDED)
        failed = conditions.get("FailureTarget") or conditions.get("Failed")
        if failed is not None:
            # The Jobs watch may run ahead of the pods watch: give the pods watch time to show which pod
            # failed (a lost node's pod is a preemption, not a crash) before taking the Job's own word.
            noticed = self._job_failed_unexplained.setdefault(key, time.monotonic())
            if time.monotonic() - noticed < JOB_FAILED_WAIT_SECONDS:
                return AttemptStatus(Phase.PENDING)
            return AttemptStatus(Phase.FAILED, "RankFailed",
                                 f"the Kubernetes Job {info['name']} failed: {failed.get('reason', '')} "
                                 f"{failed.get('message', '')}".strip())
        blocked = self._blocked(key, job, pods, len(gone), info.get("pods", info["world_size"]))
        if blocked is not None:
            return _failed(blocked)
        phases = [p.get("status", {}).get("phase") for p in pods if not p["metadata"].get("deletionTimestamp")]
        expected = info.get("pods", info["world_size"])
        if len(phases) == expected and all(phase == "Succeeded" for phase in phases):
            return AttemptStatus(Phase.SUCCEEDED)
        if len(phases) == expected and all(phase in ("Running", "Succeeded") for phase in phases):
            return AttemptStatus(Phase.RUNNING)
        return AttemptStatus(Phase.PENDING)

    def _first_failure(self, key: tuple[str, int], pods: list[dict[str, Any]],
                       seen: dict[str, int]) -> _Failure | None:
        """The attempt's earliest failure (see the module's docstring), or None while no rank has failed (a
        lost node's pod alone is not one)."""
        stopped_by_us = key in self._stopped_attempts
        failures = [(f, seen.get(p["metadata"].get("uid", ""), self.cache.sightings + 1))
                    for p in pods if (f := _failure_of(p, stopped_by_us)) is not None]
        if not any(not f.suspect for f, _ in failures):
            return None
        return min(failures, key=lambda pair: (pair[0].when, pair[1], pair[0].cause))[0]

    def _blocked(self, key: tuple[str, int], job: dict[str, Any], pods: list[dict[str, Any]], gone: int,
                 expected: int) -> _Failure | None:
        """Why the attempt cannot start and never will: an image that cannot be pulled, a pod no node takes,
        pods the Job cannot create (admission refused them) or has not created in time."""
        for pod in pods:
            blocked = self._blocked_pod(pod)
            if blocked is not None:
                return blocked
        if job["spec"].get("suspend") or len(pods) + gone >= expected:
            return None
        name = job["metadata"]["name"]
        refusal = self._refusal(key, job)
        if refusal is not None and refusal.permanent:
            return _Failure(time.time(), _EXITED, "PodsRefused",
                            f"the Kubernetes Job {name} cannot create its pods: {refusal.message}", retryable=False)
        started = _parse_time(job.get("status", {}).get("startTime"))
        waited = time.time() - started if started is not None else 0.0
        if waited >= self.settings.unschedulable_timeout_seconds:  # a quota may free up meanwhile: wait
            return _Failure(time.time(), _EXITED, "PodsRefused",
                            f"the Kubernetes Job {name} created {len(pods) + gone} of its {expected} pods in "
                            f"{waited:.0f} s" + (f": {refusal.message}" if refusal else ""))
        return None

    def _refusal(self, key: tuple[str, int], job: dict[str, Any]) -> _Refusal | None:
        """Why admission refused the Job's pods, from its newest FailedCreate event (a Job's status does not
        say); looked up at most every EVENTS_CHECK_SECONDS, and no more once the refusal is permanent."""
        checked, found = self._refusals.get(key, (None, None))
        if (found is not None and found.permanent) or \
                (checked is not None and time.monotonic() - checked < EVENTS_CHECK_SECONDS):
            return found
        meta = job["metadata"]
        try:
            events = self._call(self.core.list_namespaced_event, self.namespace,
                                field_selector=f"involvedObject.uid={meta['uid']},reason=FailedCreate")
        except ApiException as exc:
            log.warning("cannot read the events of Job %s: %s", meta["name"], _short(exc))
            events = {}
        items = events.get("items") or []
        if items:
            newest = max(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            said = newest.get("message", "")
            # Admission's refusals (forbidden: a PriorityClass, Pod Security, a LimitRange; a webhook's denial)
            # repeat on every try; a quota frees up, and other errors pass.
            refused = "forbidden" in said or "denied the request" in said
            found = _Refusal(said, permanent=refused and "exceeded quota" not in said)
        self._refusals[key] = (time.monotonic(), found)
        return found

    def _blocked_pod(self, pod: dict[str, Any]) -> _Failure | None:
        status = pod.get("status") or {}
        who = f"{_ranks_text(pod)} (pod {pod['metadata']['name']})"
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _IMAGE_PULL_REASONS:
                image = container.get("image") or _container_spec(pod).get("image", "?")
                return _Failure(time.time(), _EXITED, "ImagePullFailed",
                                f"{who} cannot pull image {image} ({waiting['reason']}: "
                                f"{waiting.get('message', '')})", retryable=False)
            said = waiting.get("message", "")
            if waiting.get("reason") == "CreateContainerConfigError" and \
                    ("not found" in said or "couldn't find key" in said):
                # A Secret or key the spec's env_from_secrets names is missing (the attempt's own Secret exists
                # before its pods): the kubelet would retry for ever.
                return _Failure(time.time(), _EXITED, "ContainerConfigFailed",
                                f"{who} cannot start its container: {said} (check the Secrets and keys in "
                                "kubernetes.env_from_secrets)", retryable=False)
        scheduled = _condition(pod, "PodScheduled")
        if status.get("phase") == "Pending" and scheduled and scheduled.get("status") == "False" \
                and scheduled.get("reason") == "Unschedulable":
            since = _parse_time(scheduled.get("lastTransitionTime")) or time.time()
            waited = time.time() - since
            if waited >= self.settings.unschedulable_timeout_seconds:
                return _Failure(time.time(), _EXITED, "Unschedulable",
                                f"{who} unschedulable for {waited:.0f} s: {scheduled.get('message', '')}")
        return None

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        """Deletes the attempt's Job (its Service, Secret and pods go with it) and each of its pods the watch
        has seen, with the grace asked for, at least 1 s: a pod is then removed only once its kubelet has
        stopped the container, so no rank outlives its pod (0 would remove the pod at once while its
        container still runs). A pod whose node has not confirmed the stop long after its grace is removed by
        force. Returns without waiting; only deletes what a call before it did not already cover."""
        name = ref.launch_info.get("name") or manifests.object_name(ref.job, ref.attempt)
        key = (ref.job, ref.attempt)
        self._stopped_attempts.add(key)
        grace = max(1, int(grace_seconds))
        self._wait_synced()
        with self.cache.lock:
            pods = [p for p in self.cache.objects["pods"].values() if _attempt_of(p) == key]
        if key not in self._jobs_deleted:
            self._delete(self.batch.delete_namespaced_job, name, propagation_policy="Background",
                         grace_period_seconds=grace)
            self._jobs_deleted.add(key)
        now = time.time()
        for pod in pods:
            meta = pod["metadata"]
            ends = _parse_time(meta.get("deletionTimestamp"))
            if ends is None or ends > now + grace:  # not deleted yet, or with a longer grace
                self._delete(self.core.delete_namespaced_pod, meta["name"], grace_period_seconds=grace)
            elif now - ends > FORCE_DELETE_AFTER_SECONDS:
                log.warning("pod %s is still there %.0f s after its grace ended (its node does not answer): "
                            "removing it by force", meta["name"], now - ends)
                self._delete(self.core.delete_namespaced_pod, meta["name"], grace_period_seconds=0)

    def ranks_gone(self, ref: AttemptRef) -> bool:
        """True once the watch shows neither the attempt's Job (which could still make pods) nor any of its
        pods, confirmed by one listing (the watch may not have shown a pod yet). A pod still terminating,
        which the API keeps until its kubelet has stopped its container, still runs ranks."""
        name = ref.launch_info.get("name") or manifests.object_name(ref.job, ref.attempt)
        key = (ref.job, ref.attempt)
        self._wait_synced()
        with self.cache.lock:
            if name in self.cache.objects["jobs"] or \
                    any(_attempt_of(p) == key for p in self.cache.objects["pods"].values()):
                return False
        if self._list("pods", manifests.selector(ref.job, ref.attempt))["items"]:
            return False
        with self.cache.lock:  # nothing of it is left to classify
            for pod in self.cache.vanished.pop(key, {}).values():
                self.cache.failure_seen.pop(pod["metadata"].get("uid", ""), None)
        self._refusals.pop(key, None)
        self._job_failed_unexplained.pop(key, None)
        return True

    def logs(self, ref: AttemptRef, rank: int, follow: bool, attempt_ended: Callable[[], bool],
             where: LogRange = LogRange()) -> Iterator[LogRead]:
        """The rank's container log (`kubectl logs`); a pod that is gone has no log left to read. The API
        serves a log from its start: an offset is reached by skipping, and a tail is found by a first read
        of the whole log. While following, the read waits in the API server's stream (the caller runs it on
        a thread of its own pool). A node that does not answer (the API server says 500 or 503 for its
        kubelet) raises LogsUnavailable with why."""
        while True:
            ended = attempt_ended()
            pod = self._pod_of_rank(ref, rank)
            if pod is not None and pod.get("status", {}).get("phase") != "Pending":
                break
            if not follow or ended:
                return
            yield LogRead(0, b"")  # nothing yet: the caller asks again after a pause
        name = pod["metadata"]["name"]
        skip = where.offset
        if where.tail_bytes or where.tail_lines:
            skip = tail_start(self._pod_log(name, rank, follow=False), where)
        position = 0
        for chunk in self._pod_log(name, rank, follow):
            if position + len(chunk) > skip:
                start = max(0, skip - position)
                yield LogRead(position + start, chunk[start:])
            position += len(chunk)

    def _pod_log(self, pod: str, rank: int, follow: bool) -> Iterator[bytes]:
        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, container=manifests.CONTAINER,
                                                         follow=follow, _preload_content=False)
        except ApiException as exc:
            if exc.status in (400, 404):
                return
            if exc.status in (500, 502, 503, 504):
                raise LogsUnavailable(f"the log of rank {rank} (pod {pod}) cannot be read now: {_api_message(exc)}") from None
            raise
        try:
            yield from response.stream(LOG_READ_BYTES)
        finally:
            response.close()  # the reader may stop early (a client that went away)

    # -- the watches ---------------------------------------------------------------------------------------

    def _watch_loop(self, kind: str) -> None:
        version: str | None = None
        retry_in = WATCH_RETRY_SECONDS[0]
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._relist(kind)
                version = self._watch(kind, version)
                retry_in = WATCH_RETRY_SECONDS[0]  # a watch that ran: the API server is back
            except ApiException as exc:
                if exc.status == 410:  # the version is gone: re-list to catch up
                    log.info("watch of %s: resourceVersion %s expired; re-listing", kind, version)
                    version = None
                    continue
                retry_in = self._wait_to_retry(kind, _short(exc), retry_in)
            except Exception as exc:
                if self._stopping.is_set():
                    return  # close() cut the stream
                retry_in = self._wait_to_retry(kind, _short(exc), retry_in)

    def _wait_to_retry(self, kind: str, why: str, wait: float) -> float:
        """One line per failed watch (an API server restarting refuses connections, then answers 403 until
        its RBAC is loaded); returns the next, longer wait."""
        log.warning("watch of %s failed (%s); retrying in %.0f s", kind, why, wait)
        self._stopping.wait(wait)
        return min(wait * 2, WATCH_RETRY_SECONDS[1])

    def _relist(self, kind: str) -> str:
        listing = self._list(kind, f"{manifests.LABEL_MANAGED}={manifests.MANAGED_BY}")
        fresh = {item["metadata"]["name"]: item for item in listing["items"]}
        with self.cache.lock:
            self.cache.sightings += 1  # everything this listing shows is seen at once
            if kind == "pods":  # pods that vanished while nobody watched were lost too
                for name, old in self.cache.objects["pods"].items():
                    if name not in fresh:
                        self._note_vanished(old)
                for pod in fresh.values():
                    self._note_failure(pod)
            self.cache.objects[kind] = fresh
        self.cache.synced[kind].set()
        if kind == "pods":
            for pod in fresh.values():
                self._label_rank(pod)
        return listing["metadata"]["resourceVersion"]

    def _watch(self, kind: str, version: str) -> str:
        """Follows one watch request to its end; returns the last version seen. ApiException(410) if gone."""
        list_call = self.core.list_namespaced_pod if kind == "pods" else self.batch.list_namespaced_job
        response = list_call(self.namespace, label_selector=f"{manifests.LABEL_MANAGED}={manifests.MANAGED_BY}",
                             watch=True, resource_version=version, timeout_seconds=self.settings.watch_seconds,
                             allow_watch_bookmarks=True, _preload_content=False)
        with self._watches_lock:
            if self._stopping.is_set():
                response.close()
                return version
            self._open_watches[kind] = response
        try:
            for line in _lines(response, self._stopping):
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message", ""))
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "BOOKMARK":
                    continue
                self._apply(kind, event["type"], obj)
        finally:
            with self._watches_lock:
                self._open_watches.pop(kind, None)
            response.close()  # a stream cut short must not go back to the connection pool
        return version

    def _apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self.cache.lock:
            self.cache.sightings += 1  # events come in the API server's write order
            if event_type == "DELETED":
                self.cache.objects[kind].pop(name, None)
                if kind == "pods":
                    self._note_vanished(obj)
            else:
                self.cache.objects[kind][name] = obj
                if kind == "pods":
                    self._note_failure(obj)
        if kind == "pods" and event_type != "DELETED":
            self._label_rank(obj)
        ended = event_type == "DELETED" or obj.get("status", {}).get("phase") in ("Succeeded", "Failed") \
            or (kind == "pods" and _failure_of(obj, False) is not None)
        if kind == "pods" and ended and self._notify is not None:
            self._notify(_attempt_of(obj)[0])

    def _note_failure(self, pod: dict[str, Any]) -> None:
        """Records when the pod's failure was first seen. (Lock held.)"""
        uid = pod["metadata"].get("uid", "")
        if uid not in self.cache.failure_seen and _failure_of(pod, False) is not None:
            self.cache.failure_seen[uid] = self.cache.sightings

    def _note_vanished(self, pod: dict[str, Any]) -> None:
        """Keeps the last state of a pod removed before it succeeded: how it failed, or, for one removed while
        it ran (a lost node, by hand), when (now, if its deletion did not say). (Lock held.)"""
        key = _attempt_of(pod)
        if pod.get("status", {}).get("phase") == "Succeeded":
            return
        last = dict(pod, metadata=dict(pod["metadata"]))
        if not last["metadata"].get("deletionTimestamp"):
            last["metadata"].update(deletionTimestamp=_iso(time.time()), deletionGracePeriodSeconds=0)
        self.cache.vanished.setdefault(key, {})[last["metadata"]["name"]] = last
        self._note_failure(last)

    def _label_rank(self, pod: dict[str, Any]) -> None:
        """Labels the pod with its (first) rank, for `kubectl get pods -l roundhouse.io/rank=N`."""
        if manifests.LABEL_RANK not in (pod["metadata"].get("labels") or {}) and _rank_of(pod) is not None:
            try:
                self.core.patch_namespaced_pod(pod["metadata"]["name"], self.namespace,
                                               {"metadata": {"labels": {manifests.LABEL_RANK: str(_rank_of(pod))}}},
                                               _preload_content=False)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("cannot label pod %s with its rank: %s", pod["metadata"]["name"], _short(exc))

    # -- API helpers ---------------------------------------------------------------------------------------

    def _wait_synced(self) -> None:
        for event in self.cache.synced.values():
            event.wait(timeout=10)

    @_retry
    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = method(*args, _preload_content=False, **kwargs)
        return json.loads(response.data or b"{}")

    def _list(self, kind: str, selector: str) -> dict[str, Any]:
        list_call = self.core.list_namespaced_pod if kind == "pods" else self.batch.list_namespaced_job
        return self._call(list_call, self.namespace, label_selector=selector)

    def _delete(self, method: Callable[..., Any], name: str, **options: Any) -> None:
        """Deletes one object; one already gone is fine."""
        try:
            self._call(method, name, self.namespace, **options)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _get_job(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call(self.batch.read_namespaced_job, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _create_or_get(self, kind: str, manifest: dict[str, Any]) -> dict[str, Any]:
        create, read = {
            "jobs": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "services": (self.core.create_namespaced_service, self.core.read_namespaced_service),
        }[kind]
        try:
            return self._call(create, self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
        return self._call(read, manifest["metadata"]["name"], self.namespace)

    def _create_secret(self, manifest: dict[str, Any]) -> None:
        """Creates the attempt's Secret; one already there (409) is what an interrupted launch of this attempt
        made (its name is the attempt's, its Job checked to be ours): it is never read back, so the Role grants
        no read of any Secret in the namespace."""
        self._create_only(self.core.create_namespaced_secret, manifest)

    def _create_only(self, create: Callable[..., Any], manifest: dict[str, Any]) -> None:
        """Creates an object of the attempt that nothing reads back; one already there (409) is an earlier,
        interrupted launch's."""
        try:
            self._call(create, self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _pod_of_rank(self, ref: AttemptRef, rank: int) -> dict[str, Any] | None:
        self._wait_synced()
        with self.cache.lock:
            return next((p for p in self.cache.objects["pods"].values()
                         if _attempt_of(p) == (ref.job, ref.attempt) and rank in _ranks_of(p)), None)


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client for the cluster: the given kubeconfig; else, inside a pod, its service account (in-cluster
    config); else the default kubeconfig (~/.kube/config, $KUBECONFIG) and its current context."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise ValueError(f"no Kubernetes cluster configured: {exc}") from None
    return client.ApiClient(configuration)


def _failed(failure: _Failure) -> AttemptStatus:
    return AttemptStatus(Phase.FAILED, failure.reason, failure.message, failure.retryable)


# What a kubelet says of a pod that is not ready yet or any more (a node that stopped reporting says nothing:
# the node lifecycle controller only turns the pod's Ready condition False).
_KUBELET_NOT_READY = {"ContainersNotReady", "PodCompleted", "ReadinessGatesNotReady"}


def _failure_of(pod: dict[str, Any], stopped_by_us: bool) -> _Failure | None:
    """How this pod failed its attempt, dated by the API's timestamps (see the module's docstring), or None.
    With `stopped_by_us`, a deletion (and the exit it caused) is this launcher's stop, not a failure."""
    meta, status = pod["metadata"], pod.get("status") or {}
    if status.get("phase") == "Succeeded":
        return None
    who = f"{_ranks_text(pod)} (pod {meta['name']})"
    ended = next((s["state"]["terminated"] for s in status.get("containerStatuses") or []
                  if (s.get("state") or {}).get("terminated")), None)
    finished = _parse_time((ended or {}).get("finishedAt"))
    deleted = _parse_time(meta.get("deletionTimestamp"))
    if deleted is not None:
        deleted -= meta.get("deletionGracePeriodSeconds") or 0  # when the deletion was asked for
    created = _parse_time(meta.get("creationTimestamp")) or 0.0
    disrupted = _condition(pod, "DisruptionTarget")
    if disrupted is not None and disrupted.get("status") != "True":
        disrupted = None
    if disrupted is not None or status.get("reason") in _PREEMPTION_REASONS:
        why = status.get("reason") or disrupted.get("reason")
        said = status.get("message") or (disrupted or {}).get("message") or ""
        when = _parse_time((disrupted or {}).get("lastTransitionTime")) or deleted or finished or created
        return _Failure(when, _DISRUPTED, PREEMPTED, f"{who} was preempted: {why}" + (f": {said}" if said else ""))
    # A node that stops reporting: the node lifecycle controller turns the Ready condition of its pods False
    # while their containers still show running (a kubelet would have reported them ended).
    ready = _condition(pod, "Ready")
    running = any((s.get("state") or {}).get("running") for s in status.get("containerStatuses") or [])
    if status.get("phase") == "Running" and running and ready is not None and ready.get("status") != "True" \
            and ready.get("reason") not in _KUBELET_NOT_READY:
        since = _parse_time(ready.get("lastTransitionTime")) or created
        return _Failure(since, _DISRUPTED, PREEMPTED, f"{who} was lost with its node (not ready since "
                        f"{ready.get('lastTransitionTime', '?')}, its kubelet no longer reports)", suspect=True)
    if deleted is not None and (finished is None or finished >= deleted):  # its exit followed its deletion
        if stopped_by_us:
            return None
        return _Failure(deleted, _DELETED, PREEMPTED, f"{who} was deleted (a lost node, or by hand)")
    if ended is not None and ended.get("exitCode", 0) != 0:
        code, when = ended["exitCode"], finished or created
        said = (ended.get("message") or "").strip()
        if ended.get("reason") == "OOMKilled":
            limit = (_container_spec(pod).get("resources") or {}).get("limits", {}).get("memory")
            return _Failure(when, _EXITED, "OOMKilled", f"{who} ran out of memory (OOMKilled, exit code {code}"
                            + (f", memory limit {limit})" if limit else ")"))
        if code == PREEMPTED_EXIT_CODE:
            return _Failure(when, _EXITED, PREEMPTED, f"{who} was preempted (exit code {code})")
        return _Failure(when, _EXITED, "RankFailed", f"{who} exited with code {code}" + (f": {said}" if said else ""))
    if status.get("phase") == "Failed":
        when = _parse_time(status.get("startTime")) or created
        return _Failure(when, _EXITED, "RankFailed",
                        f"{who} failed: {status.get('reason', '')} {status.get('message', '')}".strip())
    return None


def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _api_message(exc: ApiException) -> str:
    """The message of the API's Status in an error's body, else the HTTP reason."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def _short(exc: BaseException) -> str:
    """An error in one line: an API error's status and message, else its type and text."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {_api_message(exc)}".strip()
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _attempt_of(obj: dict[str, Any]) -> tuple[str, int]:
    labels = obj["metadata"].get("labels") or {}
    try:
        return labels.get(manifests.LABEL_JOB, ""), int(labels.get(manifests.LABEL_ATTEMPT, -1))
    except ValueError:
        return labels.get(manifests.LABEL_JOB, ""), -1


def _rank_of(pod: dict[str, Any]) -> int | None:
    """The pod's first rank: its completion index times its ranks per pod."""
    annotations = pod["metadata"].get("annotations") or {}
    index = annotations.get(manifests.COMPLETION_INDEX_ANNOTATION)
    if index is None or not index.isdigit():
        return None
    return int(index) * _ranks_per_pod(pod)


def _ranks_per_pod(pod: dict[str, Any]) -> int:
    value = (pod["metadata"].get("annotations") or {}).get(manifests.RANKS_PER_POD_ANNOTATION, "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _ranks_of(pod: dict[str, Any]) -> range:
    first = _rank_of(pod)
    return range(0) if first is None else range(first, first + _ranks_per_pod(pod))


def _ranks_text(pod: dict[str, Any]) -> str:
    ranks = _ranks_of(pod)
    if len(ranks) <= 1:
        return f"rank {_rank_of(pod)}"
    return f"ranks {ranks.start}-{ranks.stop - 1}"


def _container_spec(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod.get("spec", {}).get("containers") or [{}]
    return next((c for c in containers if c.get("name") == manifests.CONTAINER), containers[0])


def _lines(response: Any, stopping: threading.Event) -> Iterator[str]:
    """The lines of a streamed watch response (one JSON event each)."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield line.decode("utf-8")
        if stopping.is_set():
            return
    if pending.strip():
        yield pending.decode("utf-8")


# What `roundhouse serve --launcher kubernetes` may set through ServerSettings.launcher_options.
POD_OPTIONS = ("namespace", "image", "volume_claim")
LAUNCHER_OPTIONS = ("unschedulable_timeout_seconds",)


def create_launcher(settings: ServerSettings) -> KubernetesLauncher:
    """The `kubernetes` entry point of roundhouse.launchers: `settings.kubernetes` if given, else the
    defaults with `settings.launcher_options` applied; the cluster from `settings.kubeconfig`."""
    options = dict(settings.launcher_options)
    unknown = sorted(set(options) - set(POD_OPTIONS) - set(LAUNCHER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown Kubernetes launcher option(s) {', '.join(unknown)} (known: "
                         f"{', '.join(POD_OPTIONS + LAUNCHER_OPTIONS)})")
    k8s_settings = settings.kubernetes or KubernetesSettings()
    pods = dataclasses.replace(k8s_settings.pods, **{k: v for k, v in options.items() if k in POD_OPTIONS})
    k8s_settings = dataclasses.replace(k8s_settings, pods=pods,
                                       **{k: v for k, v in options.items() if k in LAUNCHER_OPTIONS})
    if settings.max_ranks is not None:
        k8s_settings = dataclasses.replace(k8s_settings, max_ranks=settings.max_ranks)
    if settings.allow_test_hooks:
        k8s_settings = dataclasses.replace(
            k8s_settings, pods=dataclasses.replace(k8s_settings.pods, allow_test_hooks=True))
    return KubernetesLauncher(api_client(settings.kubeconfig), k8s_settings)
