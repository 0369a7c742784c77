"""A small, honest stand-in for a Kubernetes API server, served over HTTP to the official client.

It serves the real paths the client uses for batch/v1 jobs, networking.k8s.io/v1 network policies (stored, not
enforced) and v1 pods, services, secrets and events in namespaces: create (POST), get, list and watch (GET
with labelSelector, equality fieldSelector, `watch=true&resourceVersion=`, timeoutSeconds,
allowWatchBookmarks: an idle watch gets BOOKMARK events), merge patches (PATCH, also on `/status`), delete
(DELETE with gracePeriodSeconds and propagationPolicy), the Eviction API (POST `/eviction`: DisruptionTarget,
then a graceful delete) and pod logs (`/log`, with follow; 500 for a pod whose node is gone). Every write
bumps one resourceVersion counter; watches replay the history after the version asked for, and a version
older than the retained history gets the ERROR event with code 410 (Gone) a real server sends, so clients
must re-list. `compact()` forgets the history, as etcd does.

Admission refuses a pod naming a PriorityClass that does not exist, or past the namespace's pod quota, with
the API server's 403 message. Pods get the API's defaults (service account, the not-ready/unreachable
tolerations of 300 s, the QoS class).

Two controllers run inline after every write, as the cluster would run them (each may be paused, so that a
test sees what happens while a cluster's lags behind the API server):
- a Job controller for Indexed Jobs (see `_sync_job`): `Suspended`/`JobResumed`, one pod per completion index
  (the index annotation and label, JOB_COMPLETION_INDEX from the label, hostname `<job>-<index>`, the
  template's subdomain, its finalizer), a FailedCreate event on the Job when admission refuses a pod, the
  counts (active, ready, terminating, succeeded, failed, completedIndexes), `FailureTarget` once a pod fails
  or is deleted (its remaining pods are deleted) and `Failed` once none is left, `SuccessCriteriaMet` and
  `Complete` once every index succeeded; its finalizer comes off a pod once the pod is counted;
- a garbage collector: removing an object deletes the objects whose ownerReferences name its uid.

Pod deletion is graceful as on a real node: a running pod asked to stop with a grace gets a
deletionTimestamp (a later delete may shorten it) and is removed only once its kubelet
(tests/support/fake_kubelet.py) has stopped the container; a pod that is not running, or a grace of 0 (a
force delete), is removed at once, its deletionTimestamp in the DELETED event, unless a finalizer still holds
it. A lost node is played step by step (`lose_node`, `mark_not_ready`, `evict_from_lost_node`), the times the
test's to choose.

Requests over HTTP may be held to a bearer token (401) and to the rules of a Role (403, as RBAC: the tests
use the shipped one), and `rbac_ready = False` forbids everything, as a restarting API server does at first.

Not modelled (tests/integration/test_fake_kube.py::test_what_the_stand_in_does_not_model): enforcement of
NetworkPolicies, LimitRanges (not served), Pod Security and webhooks; a scheduler (a pod has no PodScheduled
condition until the kubelet starts it; a test writes Unschedulable); real time (controllers run inline unless
paused, a lost node's steps when a test plays them); Foreground propagation (treated as Background),
set-based selectors, resourceVersion "0" semantics beyond "from the start"."""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

KINDS = {"pods": ("v1", "Pod"), "services": ("v1", "Service"), "secrets": ("v1", "Secret"),
         "events": ("v1", "Event"), "jobs": ("batch/v1", "Job"),
         "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy")}
_PATH = re.compile(r"^/(?:api/v1|apis/batch/v1|apis/networking\.k8s\.io/v1)/namespaces/([^/]+)/"
                   r"(pods|services|secrets|events|jobs|networkpolicies)"
                   r"(?:/([^/]+))?(?:/(status|log|eviction))?$")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_FINALIZER = "batch.kubernetes.io/job-tracking"  # the Job controller's, on every pod it makes
SHIPPED_ROLE = Path(__file__).parents[2] / "k8s" / "deploy" / "role.yaml"


def shipped_role() -> dict[str, Any]:
    """The Role the control plane runs under on a cluster (k8s/deploy/role.yaml)."""
    return yaml.safe_load(SHIPPED_ROLE.read_text())


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _intervals(indexes: list[int]) -> str:
    """Sorted indexes as a Job's status writes them: "0-2,5"."""
    runs: list[list[int]] = []
    for index in indexes:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def qos_class(spec: dict[str, Any]) -> str:
    """The QoS class the API server gives a pod: Guaranteed when every container's cpu and memory limits are
    set and its requests equal them, BestEffort when no container asks for anything, else Burstable."""
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, {**(r.get("limits") or {}), **(r.get("requests") or {})}
        if any(kind not in limits or requests[kind] != limits[kind] for kind in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def matches(obj: dict[str, Any], selector: str | None) -> bool:
    """Equality-based label selectors only ("a=b,c=d"), which is what the launcher uses."""
    if not selector:
        return True
    have = obj["metadata"].get("labels") or {}
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if have.get(key.strip()) != value.strip():
            return False
    return True


def field_matches(obj: dict[str, Any], selector: str | None) -> bool:
    """Equality field selectors ("involvedObject.uid=x,reason=FailedCreate"), as events are listed."""
    for term in (selector or "").split(","):
        if not term:
            continue
        path, _, value = term.partition("=")
        found: Any = obj
        for part in path.strip().split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if str(found) != value.strip():
            return False
    return True


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch (the client sends dict patches; maps merge, lists are replaced)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    def __init__(self, token: str | None = None, role: dict[str, Any] | None = None) -> None:
        # Authentication and authorization of requests over HTTP (the kubelet and tests call in directly): a
        # bearer token (401 without it), and the rules of a Role (403 for what it does not grant, as RBAC).
        self.token = token
        self.role = role
        self.rbac_ready = True  # False: every request is forbidden, as a restarting API server's are at first
        self.changed = threading.Condition()
        self.version = 0
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in KINDS}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, object)
        self.oldest = 0  # watches from a version older than this get 410 Gone
        self.pod_logs: dict[tuple[str, str], Path] = {}  # filled by the kubelet
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path) served, for tests to look at
        self._created: dict[str, set[int]] = {}  # Job uid -> indexes it made a pod for (never replaced)
        self._stopped = False
        self._epoch = 0  # bumped by expire_watches(): open watches end
        self.gone_sent = 0  # ERROR 410 events sent
        # Admission: the PriorityClasses that exist (a pod naming another is refused) and the most pods the
        # namespace's ResourceQuota allows (None: no quota). The Job controller reports a refusal as a
        # FailedCreate event on the Job and creates no pod.
        self.priority_classes: set[str] = {"system-cluster-critical", "system-node-critical"}
        self.pod_quota: int | None = None
        # Pods whose node is gone: their logs, which the API server proxies from the kubelet, answer 500.
        self.unreachable_pods: set[tuple[str, str]] = set()
        self.events_kept = True  # False: events are gone at once (a cluster keeps them an hour, --event-ttl)
        self.bookmark_seconds = 0.5  # how often an idle watch that asked for bookmarks gets one
        self.bookmarks_sent = 0
        # The controllers run inline after every write unless paused (pause_job_controller,
        # pause_garbage_collector), as a cluster's run behind the API server.
        self.job_controller_paused = False
        self.garbage_collector_paused = False
        self._owners_gone: list[tuple[str, str]] = []  # (namespace, uid) whose dependents are yet to be deleted

    # -- serving -------------------------------------------------------------------------------------------

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            kube = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube", daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        with self.changed:
            self._stopped = True  # ends open watches
            self.changed.notify_all()

    def expire_watches(self) -> None:
        """Ends every open watch and compacts: a client resuming from its last version must re-list."""
        with self.changed:
            self._epoch += 1
        self.compact()

    def compact(self) -> None:
        """Forgets the event history, as etcd compaction does: watches from any older version get 410."""
        with self.changed:
            self.history.clear()
            self.oldest = self.version + 1
            self.changed.notify_all()

    # -- the store -----------------------------------------------------------------------------------------

    def _record(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, kind, event, copy.deepcopy(obj)))
        self.changed.notify_all()

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.changed:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            name = meta.get("name")
            if not name and meta.get("generateName"):
                name = meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if not name:
                raise ApiError(422, "Invalid", "metadata.name: Required value")
            if (namespace, name) in self.objects[kind]:
                raise ApiError(409, "AlreadyExists", f'{kind} "{name}" already exists')
            api_version, obj_kind = KINDS[kind]
            obj["apiVersion"], obj["kind"] = api_version, obj_kind
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now_iso())
            if kind == "secrets" and "stringData" in obj:  # the API server folds stringData into data
                data = obj.setdefault("data", {})
                for key, value in obj.pop("stringData").items():
                    data[key] = base64.b64encode(value.encode()).decode()
            if kind == "pods":
                obj.setdefault("status", {"phase": "Pending"})
            if kind == "jobs":
                obj.setdefault("status", {})
            self.objects[kind][(namespace, name)] = obj
            self._record(kind, "ADDED", obj)
            self._run_controllers()
            return copy.deepcopy(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        with self.changed:
            obj = self.objects[kind].get((namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, kind: str, namespace: str, selector: str | None = None,
             fields: str | None = None) -> dict[str, Any]:
        with self.changed:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[kind].items())
                     if ns == namespace and matches(o, selector) and field_matches(o, fields)]
            return {"apiVersion": KINDS[kind][0], "kind": KINDS[kind][1] + "List",
                    "metadata": {"resourceVersion": str(self.version)}, "items": items}

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self.changed:
            obj = self.objects[kind].get((namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            patch = copy.deepcopy(patch)
            patch.get("metadata", {}).pop("resourceVersion", None)
            merge(obj, patch)
            self._record(kind, "MODIFIED", obj)
            if self._deleted_and_released(obj):
                self._remove(kind, namespace, name)
            self._run_controllers()
            return copy.deepcopy(obj)

    @staticmethod
    def _deleted_and_released(obj: dict[str, Any]) -> bool:
        """Deleted with no grace left (or none asked) and no finalizer holding it: the API server removes it."""
        meta = obj["metadata"]
        return "deletionTimestamp" in meta and meta.get("deletionGracePeriodSeconds") == 0 and \
            not meta.get("finalizers")

    def delete(self, kind: str, namespace: str, name: str, grace: int | None = None,
               propagation: str | None = None) -> dict[str, Any]:
        with self.changed:
            obj = self.objects[kind].get((namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            if kind == "pods" and obj["status"].get("phase") == "Running":
                grace = obj["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
                if grace > 0:  # the kubelet stops the container, then removes the pod (delete with grace 0)
                    meta = obj["metadata"]
                    ends = datetime.now(UTC) + timedelta(seconds=grace)
                    # A later delete may shorten the grace, never lengthen it.
                    if "deletionTimestamp" not in meta or ends < _parse(meta["deletionTimestamp"]):
                        meta["deletionTimestamp"] = ends.strftime("%Y-%m-%dT%H:%M:%SZ")
                        meta["deletionGracePeriodSeconds"] = grace
                        self._record(kind, "MODIFIED", obj)
                        self._run_controllers()  # the Job counts it terminating
                    return copy.deepcopy(self.objects[kind].get((namespace, name), obj))
            # Removed at once (grace 0 is a force delete: the pod goes whether or not its container stopped),
            # unless finalizers hold it: then it stays, marked deleted, until the last one is removed.
            meta = obj["metadata"]
            meta.setdefault("deletionTimestamp", now_iso())
            meta["deletionGracePeriodSeconds"] = 0
            if meta.get("finalizers"):
                self._record(kind, "MODIFIED", obj)
                self._run_controllers()  # the Job controller may let it go now
                return copy.deepcopy(self.objects[kind].get((namespace, name), obj))
            self._remove(kind, namespace, name, orphan=propagation == "Orphan")
            self._run_controllers()
            return {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}

    def evict(self, namespace: str, name: str) -> dict[str, Any]:
        """The Eviction API: the pod gets the DisruptionTarget condition, then a graceful delete."""
        with self.changed:
            pod = self.objects["pods"].get((namespace, name))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found')
            pod["status"].setdefault("conditions", []).append({
                "type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting", "lastTransitionTime": now_iso()})
            self._record("pods", "MODIFIED", pod)
            self.delete("pods", namespace, name)
            return {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}

    def _remove(self, kind: str, namespace: str, name: str, orphan: bool = False) -> None:
        obj = self.objects[kind].pop((namespace, name))
        self._record(kind, "DELETED", obj)
        if not orphan:
            self._owners_gone.append((namespace, obj["metadata"]["uid"]))
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        """The garbage collector: deletes the objects whose ownerReferences name an owner that is gone (a
        running pod gracefully, through its kubelet; one held by finalizers stays until they are removed)."""
        while self._owners_gone and not self.garbage_collector_paused:
            namespace, uid = self._owners_gone.pop(0)
            for dependent_kind in KINDS:
                for (ns, dependent), dep in list(self.objects[dependent_kind].items()):
                    owners = dep["metadata"].get("ownerReferences") or []
                    if ns == namespace and any(o.get("uid") == uid for o in owners) and \
                            (ns, dependent) in self.objects[dependent_kind]:
                        self.delete(dependent_kind, ns, dependent)

    def pause_garbage_collector(self) -> None:
        """The garbage collector runs behind the API server's writes, as a cluster's does, until resumed:
        an owner's dependents outlive it meanwhile."""
        with self.changed:
            self.garbage_collector_paused = True

    def resume_garbage_collector(self) -> None:
        with self.changed:
            self.garbage_collector_paused = False
            self._collect_garbage()

    def pause_job_controller(self) -> None:
        """The Job controller does nothing (a slow or restarting controller manager) until resumed: no pods
        made, no status, and its finalizer holds every pod of a Job, deleted or not."""
        with self.changed:
            self.job_controller_paused = True

    def resume_job_controller(self) -> None:
        with self.changed:
            self.job_controller_paused = False
            self._run_controllers()

    def watch_events(self, kind: str, namespace: str, selector: str | None, since: int):
        """(rv, type, object) after `since`, for as long as the caller iterates, and (rv, None, None) when
        nothing came for a while (every event up to rv has been given); ApiError(410) if too old."""
        last, epoch = since, self._epoch
        while not self._stopped and epoch == self._epoch:
            with self.changed:
                if last + 1 < self.oldest:
                    self.gone_sent += 1
                    raise ApiError(410, "Expired", f"too old resource version: {since} ({self.oldest - 1})")
                batch = [(rv, t, copy.deepcopy(o)) for rv, k, t, o in self.history
                         if rv > last and k == kind and o["metadata"]["namespace"] == namespace
                         and matches(o, selector)]
                newest = self.version
                if not batch:
                    self.changed.wait(0.2)
            last = max(last, newest) if not batch else batch[-1][0]
            yield from batch
            if not batch:
                yield last, None, None  # a tick: lets the caller check its deadline (and send a bookmark)

    # -- admission and events ----------------------------------------------------------------------------------

    def _admit_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        """What admission refuses (ApiError 403 with the API server's message), as a real server would."""
        name = pod["metadata"]["name"]
        wanted = pod["spec"].get("priorityClassName")
        if wanted and wanted not in self.priority_classes:
            raise ApiError(403, "Forbidden",
                           f'pods "{name}" is forbidden: no PriorityClass with name {wanted} was found')
        if self.pod_quota is not None:
            used = sum(1 for (ns, _), p in self.objects["pods"].items() if ns == namespace)
            if used >= self.pod_quota:
                raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: exceeded quota: pods, requested: '
                                                 f"pods=1, used: pods={used}, limited: pods={self.pod_quota}")

    def _event(self, namespace: str, involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """An Event about an object (one per object and reason, its count bumped when it repeats)."""
        if not self.events_kept:
            return
        meta = involved["metadata"]
        name = f"{meta['name']}.{reason.lower()}"
        event = self.objects["events"].get((namespace, name))
        if event is not None:
            event.update(count=event["count"] + 1, lastTimestamp=now_iso(), message=message)
            self._record("events", "MODIFIED", event)
            return
        event = {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message,
                 "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                              "creationTimestamp": now_iso()},
                 "involvedObject": {"kind": kind, "name": meta["name"], "namespace": namespace, "uid": meta["uid"]},
                 "count": 1, "firstTimestamp": now_iso(), "lastTimestamp": now_iso(),
                 "source": {"component": "job-controller"}}
        self.objects["events"][(namespace, name)] = event
        self._record("events", "ADDED", event)

    # -- the Job controller ----------------------------------------------------------------------------------

    def _run_controllers(self) -> None:
        if self.job_controller_paused:
            return
        for _ in range(2):  # again once pods it let go are removed: their Jobs' counts change
            for (namespace, name), job in list(self.objects["jobs"].items()):
                self._sync_job(namespace, name, job)
            if not self._release_counted_pods():
                return

    def _release_counted_pods(self) -> bool:
        """The Job controller's finalizer comes off a pod once the pod is counted in its Job's status (it
        ended, or it is being deleted: a failure) or its Job is gone; a deleted pod is then removed, unless
        its kubelet has yet to stop it (a graceful deletion)."""
        jobs = {job["metadata"]["uid"] for job in self.objects["jobs"].values()}
        removed = False
        for (namespace, name), pod in list(self.objects["pods"].items()):
            meta = pod["metadata"]
            if JOB_FINALIZER not in (meta.get("finalizers") or []):
                continue
            owner = (meta.get("ownerReferences") or [{}])[0].get("uid")
            counted = pod["status"].get("phase") in ("Succeeded", "Failed") or "deletionTimestamp" in meta
            if owner in jobs and not counted:
                continue
            meta["finalizers"] = [f for f in meta["finalizers"] if f != JOB_FINALIZER]
            if not meta["finalizers"]:
                del meta["finalizers"]
            self._record("pods", "MODIFIED", pod)
            if self._deleted_and_released(pod):
                self._remove("pods", namespace, name)
                removed = True
        return removed

    def _sync_job(self, namespace: str, name: str, job: dict[str, Any]) -> None:
        """As the Job controller (1.31+) does for an Indexed Job: `Suspended` while suspended (`JobResumed` once
        resumed); one pod per index; counts of active, ready, terminating, succeeded and failed pods (a deleted
        pod counts as failed) and the completed indexes; past the backoff limit `FailureTarget`, its running
        pods deleted, and `Failed` once none is left; `SuccessCriteriaMet`, then `Complete`."""
        spec, status = job["spec"], job["status"]
        conditions = status.setdefault("conditions", [])
        if any(c["type"] in ("Complete", "Failed") for c in conditions):
            return
        uid = job["metadata"]["uid"]
        created = self._created.setdefault(uid, set())
        suspended = _condition(job, "Suspended")
        if spec.get("suspend"):
            if suspended is None or suspended["status"] != "True":
                self._set_condition(job, "Suspended", "True", "JobSuspended", "Job suspended")
                self._record("jobs", "MODIFIED", job)
            return
        changed = False
        if suspended is not None and suspended["status"] == "True":
            self._set_condition(job, "Suspended", "False", "JobResumed", "Job resumed")
            changed = True
        if "startTime" not in status:
            status["startTime"] = now_iso()
            changed = True
        failing = _condition(job, "FailureTarget") is not None
        for index in range(spec["completions"]):
            if index not in created and not failing:
                try:
                    self._create_pod(namespace, name, job, index)
                    created.add(index)
                    changed = True
                except ApiError as exc:  # refused at admission: reported on the Job, tried again later
                    self._event(namespace, job, "Job", "FailedCreate", f"Error creating: {exc.message}")
        pods = {int(p["metadata"]["annotations"][INDEX_KEY]): p for (ns, _), p in self.objects["pods"].items()
                if ns == namespace and p["metadata"].get("ownerReferences", [{}])[0].get("uid") == uid}
        phase = {i: p["status"].get("phase") for i, p in pods.items()}
        terminating = {i for i, p in pods.items() if "deletionTimestamp" in p["metadata"]
                       and phase[i] in ("Pending", "Running")}
        succeeded = sorted(i for i in pods if phase[i] == "Succeeded")
        failed = sum(1 for i in pods if phase[i] == "Failed" or i in terminating) + \
            sum(1 for i in created if i not in pods)  # a pod that vanished before it ended counts as failed
        counts = {"active": sum(1 for i in pods if phase[i] in ("Pending", "Running") and i not in terminating),
                  "ready": sum(1 for p in pods.values() if (_condition(p, "Ready") or {}).get("status") == "True"),
                  "terminating": len(terminating), "succeeded": len(succeeded), "failed": failed,
                  "completedIndexes": _intervals(succeeded)}
        if any(status.get(k) != v for k, v in counts.items()):
            status.update(counts)
            changed = True
        if not failing and failed > spec.get("backoffLimit", 6):
            self._set_condition(job, "FailureTarget", "True", "BackoffLimitExceeded",
                                "Job has reached the specified backoff limit")
            self._record("jobs", "MODIFIED", job)
            for pod in pods.values():  # a failing Job's running pods are terminated
                key = (namespace, pod["metadata"]["name"])
                if key in self.objects["pods"] and pod["status"].get("phase") in ("Pending", "Running") and \
                        "deletionTimestamp" not in pod["metadata"]:  # (not yet removed by a nested sync)
                    self.delete("pods", *key)
            return
        if failing and not counts["active"] and not counts["terminating"]:
            self._set_condition(job, "Failed", "True", "BackoffLimitExceeded",
                                "Job has reached the specified backoff limit")
            changed = True
        elif len(succeeded) == spec["completions"]:
            self._set_condition(job, "SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number "
                                "of succeeded pods")
            self._set_condition(job, "Complete", "True", "CompletionsReached", "Reached expected number of "
                                "succeeded pods")
            status["completionTime"] = now_iso()
            changed = True
        if changed:
            self._record("jobs", "MODIFIED", job)

    @staticmethod
    def _set_condition(obj: dict[str, Any], kind: str, state: str, reason: str, message: str) -> None:
        conditions = obj["status"].setdefault("conditions", [])
        old = _condition(obj, kind)
        if old is not None:
            conditions.remove(old)
        conditions.append({"type": kind, "status": state, "reason": reason, "message": message,
                           "lastProbeTime": now_iso(), "lastTransitionTime": now_iso()})

    def _create_pod(self, namespace: str, job_name: str, job: dict[str, Any], index: int) -> None:
        template = copy.deepcopy(job["spec"]["template"])
        meta = template.get("metadata", {})
        meta["labels"] = {**meta.get("labels", {}), "job-name": job_name, INDEX_KEY: str(index),
                          "controller-uid": job["metadata"]["uid"]}
        meta["annotations"] = {**meta.get("annotations", {}), INDEX_KEY: str(index)}
        meta.update(name=f"{job_name}-{index}-{uuid.uuid4().hex[:5]}", namespace=namespace,
                    uid=str(uuid.uuid4()), creationTimestamp=now_iso())
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                    "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        meta["finalizers"] = [*meta.get("finalizers", []), JOB_FINALIZER]
        spec = template["spec"]
        spec["hostname"] = f"{job_name}-{index}"  # with the template's subdomain: <job>-<index>.<subdomain>
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            env = container.setdefault("env", [])
            if not any(e["name"] == "JOB_COMPLETION_INDEX" for e in env):  # the controller's, from the index label
                env.append({"name": "JOB_COMPLETION_INDEX",
                            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{INDEX_KEY}']"}}})
        # What the API server's defaults and admission add to every pod.
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("tolerations", []).extend([
            {"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300} for taint in ("not-ready", "unreachable")])
        self._admit_pod(namespace, {"metadata": meta, "spec": spec})
        # No PodScheduled condition until a node takes it (the simulated kubelet sets it when it starts the
        # pod; a test writes Unschedulable, as a scheduler would).
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
               "status": {"phase": "Pending", "qosClass": qos_class(spec)}}
        self.objects["pods"][(namespace, meta["name"])] = pod
        self._record("pods", "ADDED", pod)

    # -- helpers for tests (what a scheduler or kubelet would write) ------------------------------------------

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return self.list("pods", namespace, selector)["items"]

    def set_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.patch("pods", namespace, name, {"status": status})

    def lose_node(self, namespace: str, name: str) -> None:
        """The pod's node stops answering. What the control plane then does, in the order a cluster does it
        (the times are the test's to choose; a cluster waits the node monitor's grace, then the pods'
        not-ready/unreachable toleration, 300 s by default):
        at once: the pod's logs answer 500 (the API server cannot reach the kubelet); `mark_not_ready`: the
        node lifecycle controller turns its Ready condition False; `evict_from_lost_node`: the taint manager
        deletes it with DisruptionTarget, a deletion that never completes (no kubelet confirms it)."""
        self.unreachable_pods.add((namespace, name))

    def mark_not_ready(self, namespace: str, name: str) -> None:
        with self.changed:
            pod = self.objects["pods"][(namespace, name)]
            conditions = pod["status"].setdefault("conditions", [])
            ready = _condition(pod, "Ready")
            if ready is None:
                ready = {"type": "Ready"}
                conditions.append(ready)
            ready.update(status="False", lastTransitionTime=now_iso())
            ready.pop("reason", None)
            self._record("pods", "MODIFIED", pod)

    def evict_from_lost_node(self, namespace: str, name: str) -> None:
        with self.changed:
            pod = self.objects["pods"][(namespace, name)]
            pod["status"].setdefault("conditions", []).append({
                "type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                "message": "Taint manager: deleting due to NoExecute taint", "lastTransitionTime": now_iso()})
            self._record("pods", "MODIFIED", pod)
            self.delete("pods", namespace, name)


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    # HTTP/1.1 with chunked streams, as a real API server: the client reads a watch event by event.
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}") if length else {}

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        match = _PATH.match(url.path)
        self.kube.requests.append((method, self.path))
        try:
            if not match:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
            namespace, kind, name, sub = match.groups()
            self._authorize(method, namespace, kind, name, sub, query)
            if method == "GET" and sub == "log":
                if (namespace, name) in self.kube.unreachable_pods:
                    raise ApiError(500, "InternalError", f'Get "https://10.0.3.7:10250/containerLogs/{namespace}/'
                                   f'{name}/trainer": dial tcp 10.0.3.7:10250: connect: no route to host')
                self._log(namespace, name, query.get("follow") == "true")
            elif method == "POST" and sub == "eviction":
                self._send(201, self.kube.evict(namespace, name))
            elif method == "GET" and name:
                self._send(200, self.kube.get(kind, namespace, name))
            elif method == "GET" and query.get("watch") in ("true", "1"):
                self._watch(kind, namespace, query)
            elif method == "GET":
                self._send(200, self.kube.list(kind, namespace, query.get("labelSelector"), query.get("fieldSelector")))
            elif method == "POST" and not name:
                self._send(201, self.kube.create(kind, namespace, self._body()))
            elif method == "PATCH" and name:
                self._send(200, self.kube.patch(kind, namespace, name, self._body()))
            elif method == "DELETE" and name:
                options = self._body()
                grace = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
                propagation = query.get("propagationPolicy", options.get("propagationPolicy"))
                self._send(200, self.kube.delete(kind, namespace, name, None if grace is None else int(grace),
                                                 propagation))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} {url.path}")
        except ApiError as exc:
            self._send(exc.code, exc.status())

    def _authorize(self, method: str, namespace: str, kind: str, name: str | None, sub: str | None,
                   query: dict[str, str]) -> None:
        kube = self.kube
        if kube.token is not None and self.headers.get("Authorization") != f"Bearer {kube.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if kube.role is None and kube.rbac_ready:
            return
        group = KINDS[kind][0].rpartition("/")[0]
        resource = kind + (f"/{sub}" if sub in ("log", "eviction") else "")
        if method == "GET":
            verb = "get" if name else ("watch" if query.get("watch") in ("true", "True", "1") else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete"}[method]
        if sub == "status":
            resource = f"{kind}/status"
        granted = kube.rbac_ready and any(
            group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and
            verb in rule.get("verbs", []) for rule in (kube.role or {}).get("rules", []))
        if not granted:
            raise ApiError(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:{namespace}:'
                           f'roundhouse" cannot {verb} resource "{resource}" in API group "{group}" in the '
                           f'namespace "{namespace}"')

    def _watch(self, kind: str, namespace: str, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "True", "1")
        last_sent = time.monotonic()
        self._start_stream("application/json")
        try:
            try:
                for event in self.kube.watch_events(kind, namespace, query.get("labelSelector"), since):
                    version, event_type, obj = event
                    if event_type is not None:
                        self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
                        last_sent = time.monotonic()
                    elif bookmarks and time.monotonic() - last_sent >= self.kube.bookmark_seconds:
                        # Where the watch has got to, though nothing it selects changed: resume from here.
                        bookmark = {"kind": KINDS[kind][1], "apiVersion": KINDS[kind][0],
                                    "metadata": {"resourceVersion": str(version),
                                                 "annotations": {"k8s.io/initial-events-end": "false"}}}
                        self._chunk(json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n")
                        self.kube.bookmarks_sent += 1
                        last_sent = time.monotonic()
                    if time.monotonic() > deadline:
                        break
            except ApiError as exc:  # what a real server sends for an expired version: an ERROR event, code 410
                self._chunk(json.dumps({"type": "ERROR", "object": exc.status()}).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            return

    def _log(self, namespace: str, name: str, follow: bool) -> None:
        self.kube.get("pods", namespace, name)  # 404 for a pod that is gone
        path = self.kube.pod_logs.get((namespace, name))
        self._start_stream("text/plain")
        position = 0
        while True:
            if path and path.exists():
                with open(path, "rb") as f:
                    f.seek(position)
                    data = f.read()
                position += len(data)
                if data:
                    self._chunk(data)
            if not follow:
                self.wfile.write(b"0\r\n\r\n")
                return
            try:
                pod = self.kube.get("pods", namespace, name)
            except ApiError:
                self.wfile.write(b"0\r\n\r\n")
                return
            if pod["status"].get("phase") in ("Succeeded", "Failed"):
                follow = False  # one last read
                continue
            time.sleep(0.1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")
