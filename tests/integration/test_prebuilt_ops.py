"""A rank loads DeepSpeed's prebuilt CPU comm op from a directory it cannot write, as an image's is under
`readOnlyRootFilesystem` (issue 17): torch's extension loader would take a lock file and rewrite its build
file there, an OSError; the rank loads a copy from its temporary directory and only reads the prebuilt one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.launcher.local import free_port
from trainers import parallel

from tests.support.waiting import DEADLINE

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
