"""Runs each rank of an attempt as a local process.

Each rank runs under a small shell wrapper that writes the rank's pid when it starts and its exit code
when it ends, in the attempt's run directory. The files, not this process's memory, are the record: a
control plane killed with -9 and started again finds its ranks still running, or learns how they ended.
Each rank leads its own process group, so stopping a rank also stops whatever it spawned.

A rank that exits with PREEMPTED_EXIT_CODE got SIGTERM, checkpointed and left: the attempt ended
"Preempted", which has its own restart budget. Checkpoints go to one directory per job, shared by every
attempt, so the next attempt resumes from them (reshaped if it runs at another layout); where a job's
directories are is contract.job_dirs' rule.

A rank starts from a clean environment: the contract's variables (contract.rank_env), the spec's `env`, and
the minimum below (`minimum_environ`), never this process's own environment (its secrets included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract import job_dirs
from contract.errors import FieldViolation
from contract.rank_env import DATA_ROOTS_SEPARATOR, RankEnv
from contract.spec import JobSpec
from orchestrator import config
from orchestrator.launcher import PREEMPTED, PREEMPTED_EXIT_CODE, AttemptRef, AttemptStatus, LaunchRequest, Phase
from orchestrator.launcher.logs import LogRange, LogRead, read_log_file

if TYPE_CHECKING:
    from orchestrator.server import ServerSettings

# $1: pid file, $2: exit-code file, the rest: the rank's command. The wrapper is in the rank's process group,
# so a SIGTERM to the group reaches it too: it traps TERM (sh runs the trap only once the rank has exited)
# and so lives to record how the rank ended. A trap, not an ignore: the rank itself keeps the default.
_WRAPPER = ('trap : TERM; echo $$ > "$1"; p="$1"; e="$2"; shift 2; "$@"; c=$?; '
            'echo $c > "$e.tmp"; mv "$e.tmp" "$e"; exit $c')


def free_port() -> int:
    """A TCP port nobody listens on right now (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (to tell it from a later process that reused its pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return int(fields[19])


def minimum_environ(python: str) -> dict[str, str]:
    """What every local rank gets besides the contract's variables and its spec's `env`: a PATH of the system's
    directories and then the interpreter's (tools installed beside it are found, but the system's own come
    first: the ninja that built DeepSpeed's op at install, so a rank never rebuilds it with another ninja),
    HOME, and the locale and temporary directory of the control plane when it has them. Nothing else of ours."""
    env = {"PATH": os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin", str(Path(python).parent)]),
           "HOME": os.environ.get("HOME") or str(Path.home()),
           "PYTHONUNBUFFERED": "1"}
    for name in ("LANG", "LC_ALL", "TMPDIR"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


class LocalLauncher:
    def __init__(self, runs_dir: Path, python: str = sys.executable, max_ranks: int | None = None,
                 rank_command: list[str] | None = None, data_roots: tuple[Path, ...] = (),
                 allow_test_hooks: bool = False):
        self.runs_dir = runs_dir.absolute()  # ranks run in their attempt's directory: no relative paths
        self.python = python
        # Where a rank may read data (its data.path is checked again there), and whether ranks honour test hooks.
        self.data_roots = tuple(str(Path(root).absolute()) for root in data_roots)
        for root in self.data_roots:  # the ranks get them joined by ':' (contract.rank_env)
            if DATA_ROOTS_SEPARATOR in root:
                raise ValueError(f"data root {root}: may not contain {DATA_ROOTS_SEPARATOR!r}")
        self.allow_test_hooks = allow_test_hooks
        # How many ranks this machine may run (None: no limit; `create_launcher` defaults to the machine's cores).
        # Mutable: tests lower it to play lost nodes.
        self.max_ranks = max_ranks
        # What each rank runs (tests put a small script here instead of the trainer).
        self.rank_command = rank_command or [python, "-m", "trainers"]
        # Our own children, kept only to reap them; the files stay the record.
        self._children: dict[int, subprocess.Popen] = {}
        # Told the job's name when a rank we started exits (see `subscribe`). Ranks adopted after a restart
        # are seen at the job's next timer instead.
        self._notify: Callable[[str], None] | None = None

    def job_dir(self, job: str) -> Path:
        return job_dirs.job_dir(self.runs_dir, job)

    def attempt_dir(self, job: str, attempt: int) -> Path:
        return job_dirs.attempt_dir(self.job_dir(job), attempt)

    def log_path(self, job: str, attempt: int, rank: int) -> Path:
        return self.attempt_dir(job, attempt) / f"rank-{rank}.log"

    def checkpoint_dir(self, request: LaunchRequest) -> Path:
        """<runs>/<job>/<checkpoint.directory or "checkpoints">: one per job, shared by all its attempts."""
        return job_dirs.checkpoint_dir(self.job_dir(request.job), request.spec.checkpoint)

    def directory_violations(self, spec: JobSpec) -> list[FieldViolation]:
        """For CreateJob: a job directory or checkpoint directory that a symlink on this machine already leads
        out of where it belongs (checked again at launch, and by the rank); and Secret references, which only a
        cluster can resolve (a rank here would start without the variables its job asked for)."""
        if spec.kubernetes.env_from_secrets:
            return [FieldViolation("kubernetes.env_from_secrets", (
                "Kubernetes Secrets are only read by the kubernetes launcher; this server runs ranks as local "
                "processes (set the values in env, or submit to a server with --launcher kubernetes)"))]
        job_directory = self.job_dir(spec.name)
        if not os.path.lexists(job_directory):
            return []  # a new job's (the usual case): nothing in it can lead anywhere yet; one lstat, no realpath
        try:
            job_dirs.resolve_inside(self.runs_dir, job_directory)
            job_dirs.resolve_inside(job_directory, job_dirs.checkpoint_dir(job_directory, spec.checkpoint))
        except job_dirs.OutsideJobDir as exc:
            return [FieldViolation("checkpoint.directory", str(exc))]
        return []

    # -- Launcher protocol -------------------------------------------------------------------------------

    def subscribe(self, notify: Callable[[str], None]) -> None:
        self._notify = notify

    def capacity(self) -> int | None:
        return self.max_ranks

    def close(self) -> None:
        pass  # nothing held: the ranks and their files outlive this control plane

    def launch(self, request: LaunchRequest) -> dict[str, Any]:
        directory = self.attempt_dir(request.job, request.attempt)
        record = directory / "launch.json"
        if record.exists():
            info = json.loads(record.read_text())
            if self._all_alive_or_ended(info):
                return info  # already launched: adopt, never launch twice
        # A launch interrupted half-way (or never started): clear what it left and start the gang afresh.
        self._kill_recorded(directory, request.world_size)
        # Both refused (the launch fails, nothing written) if a symlink inside the job's directory leads out of it;
        # the rank checks its checkpoint directory again.
        # The run directories are this user's alone (0700): the spec (env values), the logs and the files the
        # ranks write there (pids, exit codes) are not for other users of the machine.
        job_directory = self.job_dir(request.job)
        config.private_dir(self.runs_dir)
        config.tighten(job_dirs.make_inside(self.runs_dir, job_directory), config.PRIVATE_DIR_MODE)
        checkpoints = job_dirs.make_inside(job_directory, self.checkpoint_dir(request))
        config.tighten(job_dirs.make_inside(job_directory, directory), config.PRIVATE_DIR_MODE)
        for stale in directory.glob("rank-*.*"):
            stale.unlink()
        spec_file = directory / "spec.json"
        with open(spec_file, "w", opener=config.private_opener) as f:  # 0600
            f.write(request.spec.model_dump_json())  # at the attempt's layout (see LaunchRequest)
        port = free_port()
        ranks = []
        for rank in range(request.world_size):
            env = self._rank_env(request, rank, port, spec_file, directory, checkpoints)
            pid_file, exit_file = directory / f"rank-{rank}.pid", directory / f"rank-{rank}.exit"
            with open(self.log_path(request.job, request.attempt, rank), "ab", opener=config.private_opener) as log:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", _WRAPPER, "rank-wrapper", str(pid_file), str(exit_file), *self.rank_command],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=directory)
            self._children[proc.pid] = proc
            threading.Thread(target=self._notify_on_exit, args=(proc, request.job), name=f"rank-exit-{proc.pid}",
                             daemon=True).start()
            ranks.append({"rank": rank, "pid": proc.pid, "start_time": _process_start_time(proc.pid)})
        info = {"dir": str(directory), "master_port": port, "ranks": ranks}
        tmp = record.with_suffix(".tmp")
        with open(tmp, "w", opener=config.private_opener) as f:
            f.write(json.dumps(info))
        os.replace(tmp, record)
        return info

    def status(self, ref: AttemptRef) -> AttemptStatus:
        info = ref.launch_info
        if not info.get("ranks"):
            return AttemptStatus(Phase.PENDING)
        directory = Path(info["dir"])
        failures: list[tuple[float, str, str]] = []  # (when, reason, message)
        running = 0
        for rank in info["ranks"]:
            # Liveness first: the wrapper writes the exit file before it exits, so a rank seen dead here
            # either has its exit file or was killed.
            alive = self._alive(rank)
            exit_file = directory / f"rank-{rank['rank']}.exit"
            if exit_file.exists():
                code = int(exit_file.read_text().strip() or -1)
                if code != 0:
                    said = last_line(directory / f"rank-{rank['rank']}.log")
                    reason = PREEMPTED if code == PREEMPTED_EXIT_CODE else "RankFailed"
                    what = f"was preempted (exit code {code})" if reason == PREEMPTED else f"exited with code {code}"
                    failures.append((exit_file.stat().st_mtime, reason,
                                     f"rank {rank['rank']} {what}" + (f": {said}" if said else "")))
            elif alive:
                running += 1
            else:
                failures.append((time.time(), "RankFailed",
                                 f"rank {rank['rank']} is gone without an exit status (killed)"))
        if failures:
            # The rank that failed first is the cause; the others usually fail because it did.
            _, reason, message = min(failures)
            return AttemptStatus(Phase.FAILED, reason, message)
        if running:
            return AttemptStatus(Phase.RUNNING)
        return AttemptStatus(Phase.SUCCEEDED)

    def stop(self, ref: AttemptRef, grace_seconds: float) -> None:
        # No grace: no SIGTERM either, so no rank starts a checkpoint it cannot finish.
        sig = signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL
        for rank in ref.launch_info.get("ranks", []):
            if self._alive(rank):
                self._signal_group(rank, sig)

    def ranks_gone(self, ref: AttemptRef) -> bool:
        return not any(self._alive(rank) for rank in ref.launch_info.get("ranks", []))

    def logs(self, ref: AttemptRef, rank: int, follow: bool, attempt_ended: Callable[[], bool],
             where: LogRange = LogRange()) -> Iterator[LogRead]:
        return read_log_file(self.log_path(ref.job, ref.attempt, rank), follow, attempt_ended, where)

    # -- helpers -----------------------------------------------------------------------------------------

    def _rank_env(self, request: LaunchRequest, rank: int, port: int, spec_file: Path,
                  directory: Path, checkpoints: Path) -> dict[str, str]:
        contract = RankEnv(
            rank=rank, world_size=request.world_size, local_rank=rank, local_world_size=request.world_size,
            master_addr="127.0.0.1", master_port=port, spec_file=str(spec_file), server=request.server_address,
            server_ca=request.tls and request.tls.server_ca, client_cert=request.tls and request.tls.client_cert,
            client_key=request.tls and request.tls.client_key,
            job=f"jobs/{request.job}", attempt=request.attempt, token=request.job_token, run_dir=str(directory),
            start_step=request.start_step, job_dir=str(self.job_dir(request.job)), checkpoint_dir=str(checkpoints),
            data_roots=self.data_roots, test_hooks=self.allow_test_hooks)
        # The spec's names were checked at CreateJob (none of ours, the loader's or the interpreter's); the
        # contract's variables come last all the same.
        return {**minimum_environ(self.python), **request.spec.env, **contract.to_environ()}

    def _alive(self, rank: dict[str, Any]) -> bool:
        self._reap(rank["pid"])
        started = _process_start_time(rank["pid"])
        return started is not None and started == rank["start_time"]

    def _all_alive_or_ended(self, info: dict[str, Any]) -> bool:
        directory = Path(info["dir"])
        return all(self._alive(r) or (directory / f"rank-{r['rank']}.exit").exists() for r in info["ranks"])

    def _kill_recorded(self, directory: Path, world_size: int) -> None:
        """Kills ranks whose wrapper recorded a pid but whose launch never finished being recorded."""
        for rank in range(world_size):
            pid_file = directory / f"rank-{rank}.pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            if _process_start_time(pid) is not None and "rank-wrapper" in _cmdline(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _signal_group(self, rank: dict[str, Any], sig: int) -> None:
        try:
            os.killpg(rank["pid"], sig)  # the wrapper leads the group: pgid == its pid
        except ProcessLookupError:
            pass

    def _notify_on_exit(self, proc: subprocess.Popen, job: str) -> None:
        proc.wait()
        if self._notify is not None:
            self._notify(job)

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None and proc.poll() is not None:
            self._children.pop(pid, None)


def last_line(log: Path, limit: int = 300) -> str:
    """The last thing a rank printed (its error, usually), shortened."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode("utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    text = next((line for line in reversed(lines) if line), "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def create_launcher(settings: ServerSettings) -> LocalLauncher:
    """The `local` entry point of roundhouse.launchers: ranks as processes of this machine, their files under
    the server's home."""
    if settings.launcher_options:
        raise ValueError(f"the local launcher takes no options, not {', '.join(sorted(settings.launcher_options))}")
    max_ranks = settings.max_ranks if settings.max_ranks is not None else default_max_ranks()
    return LocalLauncher(settings.home / "runs", max_ranks=max_ranks, data_roots=settings.data_roots,
                         allow_test_hooks=settings.allow_test_hooks)


def default_max_ranks() -> int:
    """The cores this process may run on: without `--max-ranks`, the most ranks the local launcher runs at once
    (a dp=64 job on a shared host would otherwise start 64 processes beside the control plane)."""
    return len(os.sched_getaffinity(0))
