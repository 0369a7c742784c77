"""A simulated kubelet (plus cluster DNS) for the API stand-in: runs each pod's container as a local process.

It watches the pods of one namespace on the stand-in and, for each new one, resolves the container's
environment as a kubelet does (values, fieldRef on the pod's metadata, secretKeyRef from the stand-in's
Secrets), starts `command + args` as a process in its own session with the pod's environment over the
image's, and reports phases back: Running, then Succeeded or Failed with the container's terminated state
(exit code, reason). A pod being deleted gets SIGTERM, SIGKILL after its grace, and is then removed; a pod
removed at once (grace 0, a lost node) is killed at once.

Where a node would differ from one machine, it plays the part:
- cluster DNS: MASTER_ADDR `<host>.<service>` of a headless Service resolves to 127.0.0.1, and MASTER_PORT
  (fixed in the manifests, as every pod has its own IP) becomes a free port chosen per Service;
- volumes: a mountPath in an environment value is rewritten to a local directory, per claim for a
  PersistentVolumeClaim (shared by every pod, as ReadWriteMany storage) and per pod for an emptyDir;
- readOnlyRootFilesystem: the image's directories named in `image_read_only` (DeepSpeed's prebuilt ops) are
  read-only to the container (a read-only bind mount in its own mount namespace, where this runs as root)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.launcher.local import free_port

from tests.support.fake_kube import ApiError, FakeKube, now_iso

_FIELD = re.compile(r"^metadata\.(annotations|labels)\['(.+)'\]$")


@dataclass
class _Container:
    process: subprocess.Popen
    log: Any
    kill_at: float | None = None  # SIGKILL once past this (after SIGTERM on deletion)
    grace: float | None = None  # the deletion's grace when SIGTERM was sent


class FakeKubelet:
    def __init__(self, kube: FakeKube, namespace: str, workdir: Path, claims: dict[str, Path],
                 image_env: dict[str, str], image_read_only: tuple[Path, ...] = ()):
        self.kube = kube
        self.namespace = namespace
        self.workdir = workdir
        self.claims = claims  # PersistentVolumeClaim name -> local directory
        self.image_env = image_env  # the environment the image gives every container
        # What the image's root filesystem holds that a container with readOnlyRootFilesystem cannot write:
        # mounted read-only in the container's own mount namespace (as root, where mount namespaces are
        # allowed; elsewhere it stays writable and `read_only_enforced` says so).
        self.image_read_only = image_read_only
        self.read_only_enforced = bool(image_read_only) and _can_mount_read_only()
        self.containers: dict[str, _Container] = {}  # pod name -> its process
        self.ports: dict[str, int] = {}  # Service name -> the rendezvous port its pods use here
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        for container in self.containers.values():
            _signal(container.process, signal.SIGKILL)
            container.process.wait()
            container.log.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._sync()
            except Exception as exc:  # keep going, as a kubelet does; a test sees the pods stall
                print(f"fake kubelet: {exc!r}")
            time.sleep(0.1)

    def _sync(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self.kube.pods(self.namespace)}
        for name, container in list(self.containers.items()):
            if name not in pods:  # removed without a grace: the node is gone
                _signal(container.process, signal.SIGKILL)
                container.process.wait()
                container.log.close()
                del self.containers[name]
        for name, pod in pods.items():
            container = self.containers.get(name)
            deleting = "deletionTimestamp" in pod["metadata"]
            if container is None:
                if pod["status"].get("phase") == "Pending" and not deleting:
                    self._start(pod)
                continue
            code = container.process.poll()
            if deleting and code is None:
                grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
                if container.kill_at is None:
                    _signal(container.process, signal.SIGTERM)
                    container.kill_at, container.grace = time.monotonic() + grace, grace
                elif grace < container.grace:  # a later delete shortened the grace
                    container.kill_at = min(container.kill_at, time.monotonic() + grace)
                    container.grace = grace
                elif time.monotonic() > container.kill_at:
                    _signal(container.process, signal.SIGKILL)
                continue
            if code is None or pod["status"].get("phase") in ("Succeeded", "Failed"):
                if code is not None and deleting:
                    self._remove(name)
                continue
            container.log.close()
            self.kube.set_pod_status(self.namespace, name, {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [_container_status(pod, {"terminated": {
                    "exitCode": code if code >= 0 else 128 - code,  # killed by signal N: 128 + N
                    "reason": "Completed" if code == 0 else "Error", "finishedAt": now_iso()}})]})
            if deleting:
                self._remove(name)

    def _remove(self, name: str) -> None:
        container = self.containers.pop(name, None)
        if container is not None:
            # A kubelet removes a pod only once its container's cgroup is empty: what the main process left
            # running in its group goes first.
            _signal(container.process, signal.SIGKILL)
            _wait_group_gone(container.process.pid)
            container.log.close()
        try:
            self.kube.delete("pods", self.namespace, name, grace=0)
        except ApiError:
            pass

    def _start(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        container = spec["containers"][0]
        pod_dir = self.workdir / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(pod, pod_dir)
        try:
            env = {item["name"]: self._value(pod, item) for item in container.get("env", [])}
        except KeyError as exc:  # a Secret not there yet: the kubelet retries
            self.kube.set_pod_status(self.namespace, name, {"containerStatuses": [_container_status(pod, {
                "waiting": {"reason": "CreateContainerConfigError", "message": f"not found: {exc}"}})]})
            return
        for key, value in env.items():
            for mount_path, local in mounts.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    env[key] = str(local) + value[len(mount_path):]
        if "/tmp" in mounts and "TMPDIR" not in env:  # the container's /tmp is its volume, not this host's
            env["TMPDIR"] = str(mounts["/tmp"])
        service = spec.get("subdomain")
        if service and env.get("MASTER_ADDR", "").endswith(f".{service}"):
            env["MASTER_ADDR"] = "127.0.0.1"  # cluster DNS: every pod is on this machine
            env["MASTER_PORT"] = str(self.ports.setdefault(service, free_port()))
        log_path = pod_dir / "container.log"
        log = open(log_path, "ab")
        argv = [_expand(arg, env) for arg in [*container.get("command", []), *container.get("args", [])]]
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") and self.read_only_enforced:
            argv = _with_read_only(self.image_read_only, argv)
        process = subprocess.Popen(argv,
                                   env={**self.image_env, **env}, cwd=pod_dir, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        self.containers[name] = _Container(process, log)
        self.kube.pod_logs[(self.namespace, name)] = log_path
        self.kube.set_pod_status(self.namespace, name, {
            "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": now_iso(),
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now_iso()}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [_container_status(pod, {"running": {"startedAt": now_iso()}})]})

    def _mounts(self, pod: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        out = {}
        for mount in pod["spec"]["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.claims[volume["persistentVolumeClaim"]["claimName"]]
            else:
                local = pod_dir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            out[mount["mountPath"].rstrip("/")] = local
        return out

    def _value(self, pod: dict[str, Any], item: dict[str, Any]) -> str:
        if "value" in item:
            return item["value"]
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            field = _FIELD.match(path)
            if field:
                return pod["metadata"][field.group(1)][field.group(2)]
            return {"metadata.name": pod["metadata"]["name"], "metadata.namespace": self.namespace}[path]
        ref = source["secretKeyRef"]
        try:
            secret = self.kube.get("secrets", self.namespace, ref["name"])
        except ApiError:
            raise KeyError(f"secret {ref['name']}") from None
        return base64.b64decode(secret["data"][ref["key"]]).decode()


def _can_mount_read_only() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                          capture_output=True).returncode == 0


def _with_read_only(paths: tuple[Path, ...], argv: list[str]) -> list[str]:
    """`argv` run in its own mount namespace where each of `paths` is a read-only bind of itself (writes fail
    with EROFS, as on a read-only root filesystem); the same process, so its pid and group stay the kubelet's."""
    script = "".join(f'mount --bind "${i}" "${i}" && mount -o remount,bind,ro "${i}" && '
                     for i in range(1, len(paths) + 1))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{script}shift {len(paths)} && exec "$@"', "sh", *map(str, paths), *argv]


def _container_status(pod: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {"name": container["name"], "image": container["image"], "imageID": "", "restartCount": 0,
            "ready": "running" in state, "state": state}


def _expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) in a command or its args becomes the container's VAR, as the kubelet does."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def _wait_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """Until no live (non-zombie) process is left in the process group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_in_group(entry, pgid) for entry in Path("/proc").iterdir()):
        time.sleep(0.01)


def _in_group(entry: Path, pgid: int) -> bool:
    if not entry.name.isdigit():
        return False
    try:
        state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
    except (OSError, ValueError):
        return False
    return state != "Z" and int(group) == pgid


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
