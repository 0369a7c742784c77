"""A checkpoint on disk: its directory, its manifest (the commit), its checksums, and the retention policy.

`<root>/step-<step>/` holds one PyTorch distributed checkpoint (DCP: its index `.metadata` and shard files,
written by trainers.checkpoint_storage) and `manifest.json`: the step, the samples consumed, the layout it was
written at, the parametrization (standard or µP, with its settings), the offload placement of each rank (when
the optimizer state was offloaded), and every file's size and SHA-256. The manifest is written last,
atomically (a temporary name, fsync, rename, fsync of the directory): a directory without one is not a
checkpoint, no reader looks at it, and the next save at that step replaces it. Deleting one removes its manifest first, for the same reason."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from trainers.checkpoint_storage import RawFileReader

MANIFEST = "manifest.json"
FORMAT = "roundhouse-dcp-2"  # DCP with raw tensor bytes (trainers.checkpoint_storage)
# Each format this version reads, and DCP's storage reader for it: "roundhouse-dcp-1" was DCP's own torch.save
# files, kept readable so a job that was checkpointed before an upgrade resumes after it.
READERS = {FORMAT: RawFileReader, "roundhouse-dcp-1": FileSystemReader}
HASH_BLOCK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing or failing a check)."""


@dataclass(frozen=True)
class Manifest:
    step: int
    samples: int
    tp: int
    pp: int
    dp: int
    files: dict[str, dict[str, int | str]]  # relative path -> {"size": bytes, "sha256": hex}
    format: str = FORMAT
    commit_time: float = 0.0
    # How the weights were parametrized (trainers.mup.record): {"mup": None} or {"mup": {field: value}}; None in
    # checkpoints from before it was recorded, which were all written under the standard parametrization.
    parametrization: dict | None = None
    # With optimizer-state offload: each rank's placement, {"ranks": {"<rank>": {"mode", "subgroup_size",
    # "subgroups", "on_device", "slots"}}} (trainers.pipeline.OffloadPlacement); None without offload.
    offload: dict | None = None

    @property
    def layout(self) -> tuple[int, int, int]:
        return self.tp, self.pp, self.dp

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        try:
            data = json.loads((directory / MANIFEST).read_text())
            manifest = cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{directory / MANIFEST}: unreadable manifest: {exc}") from None
        if manifest.format not in READERS:
            raise CheckpointError(f"{directory}: format {manifest.format!r}, expected one of {sorted(READERS)}")
        return manifest

    def write(self, directory: Path) -> None:
        """Commits the checkpoint: after this returns, the manifest (and so the checkpoint) is on disk."""
        tmp = directory / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
        fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def committed_steps(root: Path) -> list[int]:
    """Steps with a manifest, newest first (the manifest's contents are checked when loading)."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        if entry.name.startswith("step-") and (entry / MANIFEST).is_file():
            try:
                steps.append(int(entry.name.removeprefix("step-")))
            except ValueError:
                continue
    return sorted(steps, reverse=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_file(directory: Path, name: str, expected: dict[str, int | str]) -> str | None:
    """Why the file fails the manifest's size or checksum, or None when it holds."""
    path = directory / name
    try:
        size = path.stat().st_size
    except OSError:
        return f"{name} is missing"
    if size != int(expected["size"]):
        return f"{name} has {size} bytes, the manifest says {expected['size']}"
    if sha256_file(path) != expected["sha256"]:
        return f"{name} fails its SHA-256 check"
    return None


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The committed steps the retention policy keeps: the newest `keep_last`, and multiples of `keep_every`."""
    newest_first = sorted(steps, reverse=True)
    keep = set(newest_first[:keep_last])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def apply_retention(root: Path, newest: int, keep_last: int, keep_every: int
                    ) -> tuple[set[int], list[tuple[int, Manifest, Path]]]:
    """Deletes the committed checkpoints up to `newest` that the policy does not keep; returns the steps it
    keeps and (step, manifest, directory) of each one it deleted."""
    steps = committed_steps(root)
    keep = retained(steps, keep_last, keep_every)
    removed = []
    for step in steps:
        if step in keep or step > newest:
            continue
        directory = step_dir(root, step)
        manifest = Manifest.read(directory)
        (directory / MANIFEST).unlink()  # uncommitted first, so no reader sees it half deleted
        shutil.rmtree(directory, ignore_errors=True)
        removed.append((step, manifest, directory))
    return keep, removed
