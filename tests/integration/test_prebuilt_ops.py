"""A rank loads DeepSpeed's prebuilt CPU comm op from a directory it cannot write, as an image's is under
`readOnlyRootFilesystem` (issue 17): torch's extension loader would take a lock file and rewrite its build
file there, an OSError; the rank loads a copy from its temporary directory and only reads the prebuilt one.

The last two tests are the image's case end to end (k8s/Dockerfile): the op built into a fresh directory, made
read-only, and a one-rank job run through the control plane to SUCCEEDED from it, with HOME and TMPDIR on a
fresh directory and no compiler on the rank's PATH (the runtime image has none): only the ninja that built the
op, which then rebuilds nothing. A ninja of another version would rebuild (its logs differ) and fail there.
And a rank run as a pod runs it: as the image's user (uid 1000), its spec in ROUNDHOUSE_SPEC_JSON, from the
installed ops read-only to it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from contract.spec import parse_spec, spec_to_proto
from orchestrator.config import token_file
from orchestrator.launcher.local import free_port
from roundhouse.v1 import job_pb2, job_service_pb2 as js
from trainers import parallel

from tests.conftest import Client, start_plane
from tests.support.waiting import DEADLINE

TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
BUILT = Path(sys.prefix) / "torch_extensions"  # where `make install` builds the op, as an image does

# A rank's start, as far as the op: torch.distributed and DeepSpeed's backend (which loads the op).
RANK = textwrap.dedent("""
    import os, sys
    from trainers import parallel
    parallel.setup(parallel.ParallelDims(tp=1, pp=1, dp=1, rank=0), "127.0.0.1", int(sys.argv[1]), 0)
    import deepspeed.comm.comm as comm
    assert comm.cdb.shm_comm_op is not None, "DeepSpeed did not load its CPU comm op"
    print("op loaded from", os.environ["TORCH_EXTENSIONS_DIR"], flush=True)
    parallel.teardown()
""")


def copy_of_the_built_ops(tmp_path: Path) -> Path:
    assert (BUILT / parallel.SHM_OP / f"{parallel.SHM_OP}.so").exists(), "make install builds the op"
    ops = tmp_path / "image" / "torch_extensions"
    shutil.copytree(BUILT, ops, ignore=shutil.ignore_patterns("lock"))
    return ops


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_a_rank_starts_from_a_read_only_extension_directory(tmp_path):
    ops = copy_of_the_built_ops(tmp_path)
    before = files(ops)
    scratch = tmp_path / "tmp"  # the pod's writable emptyDir
    scratch.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ops), "TMPDIR": str(scratch), "HOME": str(scratch)}
    argv = [sys.executable, "-c", RANK, str(free_port())]
    if os.geteuid() == 0:
        # File modes do not stop root: a read-only bind mount in a private mount namespace makes the directory
        # what a read-only root filesystem makes an image's (writes fail with EROFS).
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(ops), *argv]
    else:
        for path in [ops, *ops.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=DEADLINE)
    if os.geteuid() == 0 and result.returncode != 0 and "mount" in result.stderr and \
            ("ermission" in result.stderr or "not permitted" in result.stderr):
        pytest.skip(f"no mount namespace here to make the directory read-only: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = next(line for line in result.stdout.splitlines() if line.startswith("op loaded from"))
    assert str(scratch) in loaded  # from the rank's copy
    assert files(ops) == before  # the prebuilt directory was only read


def test_the_copy_is_made_only_for_a_directory_the_rank_cannot_write(tmp_path, monkeypatch):
    """Whatever the uid: the decision and the copy (the test above needs a mount namespace as root)."""
    ops = copy_of_the_built_ops(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ops))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert parallel.use_prebuilt_ops_read_only() is None  # writable: loaded in place
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(ops)

    before = files(ops)
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path).is_relative_to(ops) else
                        writable(path, mode))
    copy = parallel.use_prebuilt_ops_read_only()
    assert copy is not None and copy.parent == tmp_path and os.environ["TORCH_EXTENSIONS_DIR"] == str(copy)
    built = copy / parallel.SHM_OP / f"{parallel.SHM_OP}.so"
    original = ops / parallel.SHM_OP / f"{parallel.SHM_OP}.so"
    assert built.stat().st_mtime_ns == original.stat().st_mtime_ns  # same times: ninja rebuilds nothing
    assert files(ops) == before


def read_only_prefix(directory: Path) -> list[str]:
    """A command prefix that runs what follows with `directory` read-only: chmod -R a-w does for any uid but
    root, which file modes do not stop; as root, a read-only bind mount in a private mount namespace (writes
    fail with EROFS, as on a read-only root filesystem). Skips the test where no mount namespace can be made."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           text=True, timeout=DEADLINE)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here to make the directory read-only: {probe.stderr.strip()}")
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(directory)]


@pytest.mark.slow
def test_a_job_runs_to_the_end_from_a_freshly_built_read_only_op_directory_without_a_compiler(tmp_path):
    # The ranks' only tool: the ninja of the venv (DeepSpeed's dependency), the one the image has.
    ninja = Path(sys.executable).parent / "ninja"
    assert ninja.exists(), "DeepSpeed installs ninja beside the interpreter"
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "ninja").symlink_to(ninja)
    code = os.environ.get("PYTHONPATH")  # the code under test, for the build and the rank alike
    code_env = {"PYTHONPATH": code} if code else {}

    # The image's build stage: the op compiled into a fresh directory by that ninja.
    ops = tmp_path / "image" / "torch_extensions"
    build_home = tmp_path / "build-home"
    build_home.mkdir()
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env={"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin", "HOME": str(build_home),
                        "TMPDIR": str(build_home), "TORCH_EXTENSIONS_DIR": str(ops), **code_env},
                   check=True, capture_output=True, timeout=DEADLINE)
    assert (ops / parallel.SHM_OP / f"{parallel.SHM_OP}.so").exists()
    (ops / parallel.SHM_OP / "lock").unlink(missing_ok=True)
    prefix = read_only_prefix(ops)
    before = files(ops)

    # The runtime: HOME and TMPDIR a fresh empty directory (the pod's emptyDir), no compiler on PATH.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    plane = start_plane(tmp_path / "home", None, reconcile=True)
    client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    try:
        plane.launcher.rank_command = [
            *prefix, "/usr/bin/env", f"PATH={tools}", f"HOME={scratch}", f"TMPDIR={scratch}",
            f"TORCH_EXTENSIONS_DIR={ops}", *(f"{k}={v}" for k, v in code_env.items()),
            sys.executable, "-m", "trainers"]
        spec = parse_spec({"name": "read-only-ops", "model": {"layers": 2, "hidden_size": 32, "heads": 2,
                                                              "seq_length": 32},
                           "training": {"steps": 3, "global_batch_size": 2, "micro_batch_size": 2}})
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=client.metadata)
        deadline = time.monotonic() + DEADLINE
        while (job := client.jobs.GetJob(js.GetJobRequest(name="jobs/read-only-ops"), metadata=client.metadata)
               ).state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.2)
        log = plane.launcher.log_path("read-only-ops", 1, 0).read_text(errors="replace")
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, f"{job.state_message}\n{log[-3000:]}"
        assert job.current_step == 3
    finally:
        client.close()
        plane.stop()
    assert files(ops) == before  # the op directory was only read
    assert "deepspeed_shm_comm_op built successfully" in log  # DeepSpeed's words for a load, built or not
    assert "c++: not found" not in log and "Read-only file system" not in log


IMAGE_UID = 1000  # the image's user (k8s/Dockerfile `USER 1000`, runAsUser in k8s/manifests.py)
AS_IMAGE_USER = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]


def interpreter_reachable(held: Path) -> list[str]:
    """A command prefix under which other uids can reach this interpreter, or [] where they already can.

    The image's interpreter is readable by every uid; a machine's may live in a directory other users cannot
    enter (pyenv in root's 0700 home). Then, in a private mount namespace, that directory is covered by an
    empty 0755 tmpfs with only the way down to the interpreter bound back (through `held`, an empty
    directory): nothing else of it is visible, and nothing changes outside the namespace."""
    base = Path(sys.base_prefix).resolve()
    blocked = next((d for d in reversed(base.parents) if not d.stat().st_mode & 0o001), None)
    if blocked is None:
        return []
    keep = base.relative_to(blocked).parts[0]
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            'mount --bind "$1/$2" "$0" && mount -t tmpfs -o mode=755 tmpfs "$1" && mkdir "$1/$2" && '
            'mount --bind "$0" "$1/$2" && shift 2 && exec "$@"', str(held), str(blocked), keep]


@pytest.mark.slow
def test_a_rank_runs_as_the_image_s_user_from_the_read_only_installed_ops():
    """As a pod's container runs a rank: uid 1000, HOME and TMPDIR on a directory only it may write (the pod's
    emptyDir on /tmp), the op directory owned by root and writable by nobody (the image's, under
    readOnlyRootFilesystem), the spec in ROUNDHOUSE_SPEC_JSON (from the attempt's Secret), no control plane
    to report to. The interpreter and the code must be readable by that uid, as the image's are."""
    if os.geteuid() != 0:
        pytest.skip("only root can start a process as another uid")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    code = os.environ.get("PYTHONPATH")  # the code under test
    # pytest's tmp_path (/tmp/pytest-of-root/...) is 0700: another uid could not reach anything in it.
    root = Path(tempfile.mkdtemp(prefix="rh-uid1000-"))
    proc = None
    try:
        root.chmod(0o755)
        (root / "held").mkdir()
        # The image's PATH: its venv's bin (ninja, no compiler), then the system's.
        minimal = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
                   **({"PYTHONPATH": code} if code else {})}
        # The uid's own exec of the interpreter (setpriv's exec may still be privileged), which must load this
        # very Python (not fall back to another libpython) and find the venv's packages and the code.
        as_image_user = [*interpreter_reachable(root / "held"), *AS_IMAGE_USER, "/bin/sh", "-c"]
        probe = subprocess.run(
            [*as_image_user, 'exec "$@"', "probe", sys.executable, "-c",
             "import importlib.util, sys; missing = [m for m in ('torch', 'deepspeed', 'trainers')"
             " if importlib.util.find_spec(m) is None]; print(sys.version);"
             " sys.exit(f'cannot import {missing}' if missing else 0)"],
            env={**minimal, "HOME": str(root)}, cwd=root, capture_output=True, text=True, timeout=DEADLINE)
        if probe.returncode != 0 or probe.stdout.strip() != sys.version:
            pytest.skip(f"this interpreter, its venv or the code is not readable by uid {IMAGE_UID}: "
                        f"{(probe.stderr + probe.stdout).strip()[-500:]}")

        ops = copy_of_the_built_ops(root)  # owned by root
        for path in [root / "image", *(root / "image").rglob("*")]:
            path.chmod((path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0)) & ~0o222)
        before = files(ops)
        scratch = root / "scratch"  # the pod's emptyDir: the rank's own
        scratch.mkdir(mode=0o700)
        os.chown(scratch, IMAGE_UID, IMAGE_UID)
        spec = parse_spec({"name": "image-user", "model": {"layers": 2, "hidden_size": 32, "heads": 2,
                                                           "seq_length": 32},
                           "training": {"steps": 3, "global_batch_size": 2, "micro_batch_size": 2}})
        env = {**minimal, "HOME": str(scratch), "TMPDIR": str(scratch), "TORCH_EXTENSIONS_DIR": str(ops),
               "PYTHONUNBUFFERED": "1", "ROUNDHOUSE_SPEC_JSON": spec.model_dump_json(),
               "MASTER_PORT": str(free_port())}
        log_path = root / "rank.log"  # a file, not a pipe: a lingering child cannot hold the test
        with open(log_path, "wb") as log:
            # The uid the rank runs as, written by the shell that then becomes the rank.
            proc = subprocess.Popen([*as_image_user, 'id -u > "$TMPDIR/uid" && exec "$@"', "rank",
                                     sys.executable, "-m", "trainers"], env=env, cwd=scratch,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            code_returned = proc.wait(timeout=DEADLINE)
        log_text = log_path.read_text(errors="replace")
        assert code_returned == 0, log_text[-3000:]
        assert "step 3/3" in log_text
        assert "deepspeed_shm_comm_op built successfully" in log_text  # DeepSpeed's words for a load
        assert "Read-only file system" not in log_text and f"Permission denied: '{ops}" not in log_text
        assert files(ops) == before  # the installed ops were only read
        assert (scratch / "uid").read_text().strip() == str(IMAGE_UID)
    finally:
        if proc is not None:
            try:  # the rank and anything it started (its group), whatever the outcome
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
