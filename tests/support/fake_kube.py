"""A small, honest stand-in for a Kubernetes API server, served over HTTP to the official client.

It serves the real paths the client uses for batch/v1 jobs and v1 pods, services and secrets in namespaces:
create (POST), get, list and watch (GET with labelSelector, `watch=true&resourceVersion=`, timeoutSeconds),
merge patches (PATCH, also on `/status`), delete (DELETE with gracePeriodSeconds and propagationPolicy) and
pod logs (`/log`, with follow). Every write bumps one resourceVersion counter; watches replay the history
after the version asked for, and a version older than the retained history gets the ERROR event with code
410 (Gone) a real server sends, so clients must re-list. `compact()` forgets the history, as etcd does.

Two controllers run inline after every write, as the cluster would run them:
- a Job controller for Indexed Jobs with backoffLimit 0: one pod per completion index (the index annotation
  and label, hostname `<job>-<index>`, the template's subdomain), the Failed condition once a pod fails or
  vanishes (its remaining pods are deleted), Complete once every index succeeded; nothing while suspended;
- a garbage collector: removing an object removes the objects whose ownerReferences name its uid.

Pod deletion is graceful as on a real node: a running pod asked to stop with a grace gets a
deletionTimestamp and is removed only once its kubelet (tests/support/fake_kubelet.py) has stopped the container;
a pod that is not running (or a grace of 0) is removed at once. Foreground propagation is treated as
Background (the owner goes first). Not modelled: admission, quotas, field selectors, set-based selectors."""

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

KINDS = {"pods": ("v1", "Pod"), "services": ("v1", "Service"), "secrets": ("v1", "Secret"),
         "jobs": ("batch/v1", "Job")}
_PATH = re.compile(r"^/(?:api/v1|apis/batch/v1)/namespaces/([^/]+)/(pods|services|secrets|jobs)"
                   r"(?:/([^/]+))?(?:/(status|log))?$")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


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
    def __init__(self) -> None:
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

    def list(self, kind: str, namespace: str, selector: str | None = None) -> dict[str, Any]:
        with self.changed:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[kind].items())
                     if ns == namespace and matches(o, selector)]
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
            self._run_controllers()
            return copy.deepcopy(obj)

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
                    if "deletionTimestamp" not in meta:
                        meta["deletionTimestamp"] = (datetime.now(UTC) + timedelta(seconds=grace)) \
                            .strftime("%Y-%m-%dT%H:%M:%SZ")
                        meta["deletionGracePeriodSeconds"] = grace
                        self._record(kind, "MODIFIED", obj)
                    return copy.deepcopy(obj)
            self._remove(kind, namespace, name, orphan=propagation == "Orphan")
            self._run_controllers()
            return {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}

    def _remove(self, kind: str, namespace: str, name: str, orphan: bool = False) -> None:
        obj = self.objects[kind].pop((namespace, name))
        self._record(kind, "DELETED", obj)
        if orphan:
            return
        uid = obj["metadata"]["uid"]
        for dependent_kind in KINDS:  # the garbage collector
            for (ns, dependent), dep in list(self.objects[dependent_kind].items()):
                owners = dep["metadata"].get("ownerReferences") or []
                if ns == namespace and any(o.get("uid") == uid for o in owners):
                    if dependent_kind == "pods" and dep["status"].get("phase") == "Running":
                        self.delete("pods", ns, dependent)  # graceful, through the kubelet
                    else:
                        self._remove(dependent_kind, ns, dependent)

    def watch_events(self, kind: str, namespace: str, selector: str | None, since: int):
        """(rv, type, object) after `since`, for as long as the caller iterates; ApiError(410) if too old."""
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
                yield None  # a tick: lets the caller check its deadline

    # -- the Job controller ----------------------------------------------------------------------------------

    def _run_controllers(self) -> None:
        for (namespace, name), job in list(self.objects["jobs"].items()):
            self._sync_job(namespace, name, job)

    def _sync_job(self, namespace: str, name: str, job: dict[str, Any]) -> None:
        spec, status = job["spec"], job["status"]
        if any(c["type"] in ("Complete", "Failed") for c in status.get("conditions", [])):
            return
        uid = job["metadata"]["uid"]
        created = self._created.setdefault(uid, set())
        if spec.get("suspend"):
            return
        changed = False
        if "startTime" not in status:
            status["startTime"] = now_iso()
            changed = True
        for index in range(spec["completions"]):
            if index not in created:
                created.add(index)
                self._create_pod(namespace, name, job, index)
                changed = True
        pods = {int(p["metadata"]["annotations"][INDEX_KEY]): p for (ns, _), p in self.objects["pods"].items()
                if ns == namespace and p["metadata"].get("ownerReferences", [{}])[0].get("uid") == uid}
        succeeded = sum(1 for p in pods.values() if p["status"].get("phase") == "Succeeded")
        failed = sum(1 for p in pods.values() if p["status"].get("phase") == "Failed") + \
            sum(1 for i in created if i not in pods)  # a pod that vanished before it ended counts as failed
        active = sum(1 for p in pods.values() if p["status"].get("phase") in ("Pending", "Running"))
        if (status.get("active"), status.get("succeeded"), status.get("failed")) != (active, succeeded, failed):
            status.update(active=active, succeeded=succeeded, failed=failed)
            changed = True
        if failed > spec.get("backoffLimit", 6):
            status["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit",
                                     "lastTransitionTime": now_iso()}]
            self._record("jobs", "MODIFIED", job)
            for index, pod in pods.items():  # a failed Job's running pods are terminated
                if pod["status"].get("phase") in ("Pending", "Running"):
                    self.delete("pods", namespace, pod["metadata"]["name"])
            return
        if succeeded == spec["completions"]:
            status["conditions"] = [{"type": "Complete", "status": "True", "lastTransitionTime": now_iso()}]
            status["completionTime"] = now_iso()
            changed = True
        if changed:
            self._record("jobs", "MODIFIED", job)

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
        spec = template["spec"]
        spec["hostname"] = f"{job_name}-{index}"  # with the template's subdomain: <job>-<index>.<subdomain>
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}]}}
        self.objects["pods"][(namespace, meta["name"])] = pod
        self._record("pods", "ADDED", pod)

    # -- helpers for tests (what a scheduler or kubelet would write) ------------------------------------------

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return self.list("pods", namespace, selector)["items"]

    def set_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.patch("pods", namespace, name, {"status": status})


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
            if method == "GET" and sub == "log":
                self._log(namespace, name, query.get("follow") == "true")
            elif method == "GET" and name:
                self._send(200, self.kube.get(kind, namespace, name))
            elif method == "GET" and query.get("watch") in ("true", "1"):
                self._watch(kind, namespace, query)
            elif method == "GET":
                self._send(200, self.kube.list(kind, namespace, query.get("labelSelector")))
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

    def _watch(self, kind: str, namespace: str, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self._start_stream("application/json")
        try:
            try:
                for event in self.kube.watch_events(kind, namespace, query.get("labelSelector"), since):
                    if event is not None:
                        _, event_type, obj = event
                        self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
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
