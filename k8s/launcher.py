"""Runs each attempt as an Indexed Job of pods (one per node of `ranks_per_pod` ranks) through the official
Kubernetes client.

Two watch threads (pods, Jobs) keep a cache of this control plane's objects in its namespace: each lists,
then watches from the list's resourceVersion, resumes from the last version it saw when a watch ends, and
re-lists when the server says the version is gone (410). `status()` reads the cache and maps pod phases and
container states to the attempt's phase and, for a failure, its reason:

    Preempted        a pod evicted, disrupted (DisruptionTarget), deleted by someone else (a lost node), or a
                     rank that exited 4 (SIGTERM, checkpointed): spends the preemption budget
    OOMKilled        a container killed for memory
    RankFailed       a container that exited non-zero (the code is in the message)
    ImagePullFailed  the image cannot be pulled (named in the message): not retryable, the job fails at once
    Unschedulable    a pod no node could take for `unschedulable_timeout_seconds`

The first failure the watch saw is the cause (watch events arrive in the order the API server wrote them;
the rest of the gang usually fails because of it); without one (after a re-list) the earliest by time.
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
from orchestrator.launcher import PREEMPTED, PREEMPTED_EXIT_CODE, AttemptRef, AttemptStatus, LaunchRequest, Phase
from orchestrator.launcher.logs import LOG_READ_BYTES, LogRange, LogRead, tail_start

if TYPE_CHECKING:
    from orchestrator.server import ServerSettings

log = logging.getLogger(__name__)

# Pod status reasons a node or the cluster gives when it takes a pod away.
_PREEMPTION_REASONS = {"Evicted", "Preempting", "NodeLost", "NodeShutdown", "Shutdown", "Terminated",
                       "UnexpectedAdmissionError", "DeadlineExceeded"}
_IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}


@dataclass(frozen=True)
class KubernetesSettings:
    pods: PodSettings = field(default_factory=PodSettings)
    # The most ranks to start at once (None: the cluster schedules; a Job waits for room).
    max_ranks: int | None = None
    unschedulable_timeout_seconds: float = 300.0
    # A watch is re-opened (from the last version it saw) this often.
    watch_seconds: int = 60


@dataclass(frozen=True)
class _Failure:
    when: float  # seconds since the epoch
    order: int  # ties: a container's own failure before a deletion that may have followed it
    reason: str
    message: str
    retryable: bool = True


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and (exc.status in (429, 500, 502, 503, 504) or exc.status == 0)


_retry = retry(retry=retry_if_exception(_is_transient), stop=stop_after_attempt(5),
               wait=wait_exponential(multiplier=0.2, max=5), reraise=True)


def _parse_time(value: str | None) -> float:
    if not value:
        return time.time()
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()


class _Cache:
    """The objects the watches saw, by name, and what happened to each attempt (first failure, lost pods)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"pods": {}, "jobs": {}}
        self.synced = {"pods": threading.Event(), "jobs": threading.Event()}
        # (job, attempt) -> the first failure seen, in the API server's write order.
        self.first_failure: dict[tuple[str, int], _Failure] = {}
        # (job, attempt) -> failures of pods that vanished (a lost node, a deletion).
        self.vanished: dict[tuple[str, int], list[_Failure]] = {}


class KubernetesLauncher:
    def __init__(self, api: client.ApiClient, settings: KubernetesSettings = KubernetesSettings()):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.settings = settings
        self.namespace = settings.pods.namespace
        # The one place on the shared volume a spec's data.path may lead, as the ranks see it.
        self.data_roots = (manifests.data_root(settings.pods),)
        self.cache = _Cache()
        self._stopping = threading.Event()
        self._stopped_attempts: set[tuple[str, int]] = set()  # deletions of ours are not preemptions
        self._open_watches: dict[str, Any] = {}  # kind -> its streaming response, closed by close()
        self._watches_lock = threading.Lock()
        # Told the job's name when one of its pods ends or disappears (see `subscribe`).
        self._notify: Callable[[str], None] | None = None
        self._threads = [threading.Thread(target=self._watch_loop, args=(kind,), name=f"k8s-watch-{kind}",
                                          daemon=True) for kind in ("pods", "jobs")]
        for thread in self._threads:
            thread.start()

    def directory_violations(self, spec: JobSpec) -> list[FieldViolation]:
        """The shared volume is not mounted here: the job's directories are checked by the ranks."""
        return []

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
        """Creates the attempt's Job (suspended), its Secret and Service owned by it, then resumes it (unless
        Kueue admits it). Each step finds what an earlier, interrupted call already made."""
        pods = self.settings.pods
        name = manifests.object_name(request.job, request.attempt)
        job = self._create_or_get("jobs", manifests.job(request, pods))
        labels = job["metadata"].get("labels") or {}
        if (labels.get(manifests.LABEL_JOB), labels.get(manifests.LABEL_ATTEMPT)) != (request.job,
                                                                                      str(request.attempt)):
            raise RuntimeError(f"a Kubernetes Job named {name} exists in namespace {self.namespace} "
                               "but does not belong to this attempt")
        self._create_or_get("secrets", manifests.owned_by(manifests.secret(request, pods), job))
        self._create_or_get("services", manifests.owned_by(manifests.service(request, pods), job))
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
            first = self.cache.first_failure.get(key)
            vanished = list(self.cache.vanished.get(key, []))
        if job is None or job["metadata"].get("uid") != info["uid"]:
            job = self._get_job(info["name"])  # the cache may lag a launch: ask before calling it gone
            if job is None or job["metadata"].get("uid") != info["uid"]:
                return AttemptStatus(Phase.FAILED, PREEMPTED,
                                     f"the Kubernetes Job {info['name']} was deleted while the attempt ran")
        if first is not None:
            return _failed(first)
        failures = vanished + [f for pod in pods if (f := self._failure_of(pod)) is not None]
        if failures:
            return _failed(min(failures, key=lambda f: (f.when, f.order)))
        conditions = {c["type"]: c for c in job.get("status", {}).get("conditions") or []
                      if c.get("status") == "True"}
        if "Complete" in conditions:
            return AttemptStatus(Phase.SUCCEEDED)
        if "Failed" in conditions:
            # The Jobs watch may run ahead of the pods watch: before blaming the ranks, ask the API itself
            # which of the attempt's pods are gone or failed (a lost node's pod is a preemption, not a crash).
            cause = self._cause_from_the_api(key, pods)
            if cause is not None:
                return _failed(cause)
            failed = conditions["Failed"]
            return AttemptStatus(Phase.FAILED, "RankFailed",
                                 f"the Kubernetes Job {info['name']} failed: {failed.get('reason', '')} "
                                 f"{failed.get('message', '')}".strip())
        phases = [p.get("status", {}).get("phase") for p in pods if not p["metadata"].get("deletionTimestamp")]
        expected = info.get("pods", info["world_size"])
        if len(phases) == expected and all(phase == "Succeeded" for phase in phases):
            return AttemptStatus(Phase.SUCCEEDED)
        if len(phases) == expected and all(phase in ("Running", "Succeeded") for phase in phases):
            return AttemptStatus(Phase.RUNNING)
        return AttemptStatus(Phase.PENDING)

    def _cause_from_the_api(self, key: tuple[str, int], cached: list[dict[str, Any]]) -> _Failure | None:
        """The earliest failure among the attempt's pods as the API lists them now, a cached pod missing from
        the list counting as deleted; None if the list shows none."""
        listed = self._list("pods", manifests.selector(*key)).get("items") or []
        names = {pod["metadata"]["name"] for pod in listed}
        failures = [f for pod in listed if (f := self._failure_of(pod)) is not None]
        for pod in cached:
            if pod["metadata"]["name"] not in names and key not in self._stopped_attempts and \
                    pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                failures.append(_Failure(time.time(), 1, PREEMPTED, f"{_ranks_text(pod)} (pod "
                                         f"{pod['metadata']['name']}) was deleted (a lost node, or by hand)"))
        return min(failures, key=lambda f: (f.when, f.order)) if failures else None

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        """Deletes the attempt's Job (its Service, Secret and pods go with it); each pod gets SIGTERM and
        `grace_seconds` from its kubelet (0: killed at once). Returns without waiting for the pods."""
        name = ref.launch_info.get("name") or manifests.object_name(ref.job, ref.attempt)
        self._stopped_attempts.add((ref.job, ref.attempt))
        grace = max(0, int(grace_seconds))
        try:
            self._call(self.batch.delete_namespaced_job, name, self.namespace, propagation_policy="Background",
                       grace_period_seconds=grace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        # The garbage collector would give pods their own grace: delete them with the one asked for.
        for pod in self._list("pods", manifests.selector(ref.job, ref.attempt))["items"]:
            try:
                self._call(self.core.delete_namespaced_pod, pod["metadata"]["name"], self.namespace,
                           grace_period_seconds=grace)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def ranks_gone(self, ref: AttemptRef) -> bool:
        """Asks the API server, not the cache: a pod still terminating (or one the cache has not seen go)
        still runs ranks."""
        return not self._list("pods", manifests.selector(ref.job, ref.attempt))["items"]

    def logs(self, ref: AttemptRef, rank: int, follow: bool, attempt_ended: Callable[[], bool],
             where: LogRange = LogRange()) -> Iterator[LogRead]:
        """The rank's container log (`kubectl logs`); a pod that is gone has no log left to read. The API
        serves a log from its start: an offset is reached by skipping, and a tail is found by a first read
        of the whole log. While following, the read waits in the API server's stream (the caller runs it on
        a thread of its own pool)."""
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
            skip = tail_start(self._pod_log(name, follow=False), where)
        position = 0
        for chunk in self._pod_log(name, follow):
            if position + len(chunk) > skip:
                start = max(0, skip - position)
                yield LogRead(position + start, chunk[start:])
            position += len(chunk)

    def _pod_log(self, pod: str, follow: bool) -> Iterator[bytes]:
        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, container=manifests.CONTAINER,
                                                         follow=follow, _preload_content=False)
        except ApiException as exc:
            if exc.status in (400, 404):
                return
            raise
        try:
            yield from response.stream(LOG_READ_BYTES)
        finally:
            response.close()  # the reader may stop early (a client that went away)

    # -- failure reasons -----------------------------------------------------------------------------------

    def _failure_of(self, pod: dict[str, Any]) -> _Failure | None:
        """Why this pod failed its attempt, if it did (or cannot start and never will)."""
        meta, status = pod["metadata"], pod.get("status") or {}
        who = f"{_ranks_text(pod)} (pod {meta['name']})"
        disrupted = next((c for c in status.get("conditions") or []
                          if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
        if status.get("reason") in _PREEMPTION_REASONS or disrupted:
            why = status.get("reason") or disrupted.get("reason")
            said = status.get("message") or (disrupted or {}).get("message") or ""
            return _Failure(_parse_time((disrupted or {}).get("lastTransitionTime")), 1, PREEMPTED,
                            f"{who} was preempted: {why}" + (f": {said}" if said else ""))
        for container in status.get("containerStatuses") or []:
            state = container.get("state") or {}
            ended = state.get("terminated")
            if ended and ended.get("exitCode", 0) != 0:
                code, when = ended["exitCode"], _parse_time(ended.get("finishedAt"))
                said = (ended.get("message") or "").strip()
                if ended.get("reason") == "OOMKilled":
                    limit = (_container_spec(pod).get("resources") or {}).get("limits", {}).get("memory")
                    return _Failure(when, 0, "OOMKilled", f"{who} ran out of memory (OOMKilled, exit code {code}"
                                    + (f", memory limit {limit})" if limit else ")"))
                if code == PREEMPTED_EXIT_CODE:
                    return _Failure(when, 0, PREEMPTED, f"{who} was preempted (exit code {code})")
                return _Failure(when, 0, "RankFailed", f"{who} exited with code {code}" + (f": {said}" if said else ""))
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in _IMAGE_PULL_REASONS:
                image = container.get("image") or _container_spec(pod).get("image", "?")
                return _Failure(time.time(), 0, "ImagePullFailed",
                                f"{who} cannot pull image {image} ({waiting['reason']}: "
                                f"{waiting.get('message', '')})", retryable=False)
        if status.get("phase") == "Failed":
            return _Failure(time.time(), 0, "RankFailed",
                            f"{who} failed: {status.get('reason', '')} {status.get('message', '')}".strip())
        if meta.get("deletionTimestamp") and _attempt_of(pod) not in self._stopped_attempts:
            grace = meta.get("deletionGracePeriodSeconds") or 0
            return _Failure(_parse_time(meta["deletionTimestamp"]) - grace, 1, PREEMPTED,
                            f"{who} was deleted (a lost node, or by hand)")
        scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        if status.get("phase") == "Pending" and scheduled and scheduled.get("status") == "False" \
                and scheduled.get("reason") == "Unschedulable":
            waited = time.time() - _parse_time(scheduled.get("lastTransitionTime"))
            if waited >= self.settings.unschedulable_timeout_seconds:
                return _Failure(time.time(), 0, "Unschedulable",
                                f"{who} unschedulable for {waited:.0f} s: {scheduled.get('message', '')}")
        return None

    # -- the watches ---------------------------------------------------------------------------------------

    def _watch_loop(self, kind: str) -> None:
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._relist(kind)
                version = self._watch(kind, version)
            except ApiException as exc:
                if exc.status == 410:  # the version is gone: re-list to catch up
                    log.info("watch of %s: resourceVersion %s expired; re-listing", kind, version)
                    version = None
                    continue
                log.warning("watch of %s failed: %s", kind, exc)
                self._stopping.wait(1.0)
            except Exception:
                if self._stopping.is_set():
                    return  # close() cut the stream
                log.exception("watch of %s failed", kind)
                self._stopping.wait(1.0)

    def _relist(self, kind: str) -> str:
        listing = self._list(kind, f"{manifests.LABEL_MANAGED}={manifests.MANAGED_BY}")
        fresh = {item["metadata"]["name"]: item for item in listing["items"]}
        with self.cache.lock:
            if kind == "pods":  # pods that vanished while nobody watched were lost too
                for name, old in self.cache.objects["pods"].items():
                    if name not in fresh:
                        self._note_vanished(old)
            self.cache.objects[kind] = fresh
        self.cache.synced[kind].set()
        if kind == "pods":
            for pod in fresh.values():
                self._on_pod(pod)
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
            if event_type == "DELETED":
                self.cache.objects[kind].pop(name, None)
                if kind == "pods":
                    self._note_vanished(obj)
            else:
                self.cache.objects[kind][name] = obj
        if kind == "pods" and event_type != "DELETED":
            self._on_pod(obj)
        ended = event_type == "DELETED" or obj.get("status", {}).get("phase") in ("Succeeded", "Failed")
        if kind == "pods" and ended and self._notify is not None:
            self._notify(_attempt_of(obj)[0])

    def _on_pod(self, pod: dict[str, Any]) -> None:
        """Notes the attempt's first failure, and labels the pod with its (first) rank (for `kubectl -l`)."""
        key = _attempt_of(pod)
        failure = self._failure_of(pod)
        if failure is not None and failure.reason not in ("Unschedulable", "ImagePullFailed"):
            with self.cache.lock:
                self.cache.first_failure.setdefault(key, failure)
        if manifests.LABEL_RANK not in (pod["metadata"].get("labels") or {}) and _rank_of(pod) is not None:
            try:
                self.core.patch_namespaced_pod(pod["metadata"]["name"], self.namespace,
                                               {"metadata": {"labels": {manifests.LABEL_RANK: str(_rank_of(pod))}}},
                                               _preload_content=False)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("cannot label pod %s with its rank: %s", pod["metadata"]["name"], exc)

    def _note_vanished(self, pod: dict[str, Any]) -> None:
        """A pod removed before it ended, not by us: its node was lost, or someone deleted it. (Lock held.)"""
        key = _attempt_of(pod)
        if key in self._stopped_attempts or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        failure = _Failure(time.time(), 1, PREEMPTED,
                           f"{_ranks_text(pod)} (pod {pod['metadata']['name']}) was deleted "
                           "(a lost node, or by hand)")
        self.cache.vanished.setdefault(key, []).append(failure)
        self.cache.first_failure.setdefault(key, failure)

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
            "secrets": (self.core.create_namespaced_secret, self.core.read_namespaced_secret),
            "services": (self.core.create_namespaced_service, self.core.read_namespaced_service),
        }[kind]
        try:
            return self._call(create, self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
        return self._call(read, manifest["metadata"]["name"], self.namespace)

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
