"""Checkpoints that reshape: save at one (tp, pp, dp) layout, load at any other valid one, resume exactly.

The `Checkpointer` decides what a checkpoint holds and runs saves and loads; the rest is in its own modules:
the directory, manifest (the commit), checksums and retention in trainers.checkpoint_format; the snapshot
copy of an asynchronous save in trainers.checkpoint_snapshot; the optimizer's state, by global name, through
the interface in trainers.optimizer_state (whose ZeRO-1 adapter alone knows DeepSpeed's internals); raw tensor
bytes on disk in trainers.checkpoint_storage.

- Every tensor is stored at its global name and global shape. A tensor-parallel parameter is a DTensor on
  this pipeline stage's (dp, tp) mesh, `Shard(dim)` over tp (the dimension the parameter table gives) and
  `Replicate()` over dp, so DCP writes each slice once (data-parallel replicas are deduplicated) and a reader
  at another tp reads the slices it needs. Pipeline layers are keyed by their global index ("blocks.3...."),
  so a reader at another pp simply asks for the layers its stage holds.
- Contents: `model.<name>` (the fp32 master weights), `optim.exp_avg.<name>` and `optim.exp_avg_sq.<name>`
  (Adam's moments, gathered over ZeRO's data-parallel partitions as DeepSpeed's `safe_get_full_*` do),
  `optim.step`, and each rank's RNG states (`rng.rank<r>`, and `rng.cuda.rank<r>` on GPUs; restored only at
  the same layout). The learning rate and the data position are functions of the step (trainers.schedule,
  trainers.data), so the step is all they need.

Saving copies this rank's partition of the state into buffers kept from save to save, then gathers each
tensor over the data-parallel group and writes it, over process groups of its own. An asynchronous save does
all of it in a background thread: the weights and moments change only in the optimizer's step, so the copy
overlaps the next step's forward and backward, and the training loop calls `wait_for_snapshot` right before
that step's optimizer step; training waits for nothing else. At most one save is in flight: the buffers (1/dp
of the state) and the gathered tensors are the only extra memory.

With optimizer-state offload, the manifest also records each rank's placement (which subgroups of its state the
accelerator updates): a resume at the same layout places them the same way, so it repeats the run exactly on an
accelerator too (whose Adam rounds differently from the CPU's); at another layout, or without a record, the
optimizer plans afresh. A restart is the only point where the placement changes: it is planned once per run.

Loading verifies the checksums of the newest committed checkpoint (each rank hashes a share of the files); a
torn or corrupt one is reported and the next older one is tried."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from trainers.checkpoint_format import (MANIFEST, READERS, CheckpointError, Manifest, apply_retention, check_file,
                                        committed_steps, retained, sha256_file, step_dir)
from trainers.checkpoint_snapshot import PendingSave, SnapshotBuffers
from trainers.checkpoint_storage import RawFileWriter
from trainers.model import ParameterInfo
from trainers.mup import parametrization_mismatch
from trainers.optimizer_state import KINDS, MASTER, Fragment, OptimizerState
from trainers.parallel import ParallelDims
from trainers.say import say

# Kept importable from here, where they were before the split.
__all__ = ["MANIFEST", "CheckpointError", "Checkpointer", "Manifest", "committed_steps", "retained",
           "sha256_file", "step_dir"]

# Each rank writes its shards as this many files, by as many threads, each hashing its file's bytes as it
# writes them: SHA-256 and file writes release the GIL, so two threads keep two cores and the disk busy.
WRITER_THREADS = 2


class PlacementRecord(Protocol):
    """Where the optimizer updates each part of this rank's state (trainers.pipeline.OffloadPlacement)."""

    def record(self) -> dict | None:
        """What the manifest keeps for this rank; None: nothing to keep (no offload)."""

    def restore(self, record: dict) -> str | None:
        """Use a recorded placement again (at the same layout); why it was not used, or None."""


def state_key(kind: str, name: str) -> str:
    """A tensor's key in the checkpoint: "model.<global name>" for the master weight, "optim.<moment>.<name>"."""
    return f"model.{name}" if kind == MASTER else f"optim.{kind}.{name}"


class Checkpointer:
    """Saves and restores one rank's part of the training state. Every method is collective: all ranks call
    it, in the same order."""

    def __init__(self, root: Path, state: OptimizerState, table: Mapping[str, ParameterInfo], dims: ParallelDims,
                 *, global_batch_size: int, parametrization: dict, keep_last: int = 2, keep_every: int = 0,
                 report: Callable[..., None] | None = None,
                 on_shards_written: Callable[[int], None] | None = None,
                 before_snapshot_copy: Callable[[int], None] | None = None,
                 placement: PlacementRecord | None = None):
        from torch.distributed.device_mesh import init_device_mesh

        self.root = root
        self.state = state
        self.table = table
        self.dims = dims
        self.global_batch_size = global_batch_size
        self.parametrization = parametrization  # trainers.mup.record: recorded in, and checked against, manifests
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.report = report or (lambda *args, **kwargs: None)
        self.on_shards_written = on_shards_written or (lambda step: None)
        self.before_snapshot_copy = before_snapshot_copy or (lambda step: None)  # a test hook
        self.placement = placement  # with offload: recorded in the manifest, and used again on a resume
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # The whole world as (pp, dp, tp), in the rank order of trainers.parallel; each stage's tensors live
        # on its (dp, tp) slice. On the CPU even with GPUs: checkpoints are staged in host memory (the snapshot
        # copies the GPU state there), and the mesh only describes where each slice belongs.
        world = init_device_mesh("cpu", (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
        self.stage_mesh = world["dp", "tp"]
        # Saves run in a background thread: their collectives need groups that training never uses.
        self.group = dist.new_group(backend="gloo")
        self.dp_group = self._own_data_parallel_group(state.data_parallel_ranks())
        self.snapshot = SnapshotBuffers()
        self.pending: PendingSave | None = None
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, step: int, blocking: bool) -> None:
        """Snapshots the state after `step` and writes it: at once, or (not `blocking`) in the background, the
        snapshot's copy overlapping the next step until `wait_for_snapshot`. Rank 0 prints how long training
        was blocked once that is known."""
        started = time.perf_counter()
        self.wait()  # one save in flight at most: bounded memory
        fragments = self.state.fragments()
        small = {"optim.step": self.state.step(), **self._rng_states()}  # small: taken now
        placement = self.placement.record() if self.placement is not None else None  # fixed within a run
        ready = self.snapshot.training_done()
        if blocking:
            self.before_snapshot_copy(step)
            buffers = self.snapshot.copy(fragments, ready)
            self._write(step, fragments, buffers, small, placement, started)
            self._print_blocked(step, time.perf_counter() - started)
            return

        def copy() -> list[torch.Tensor | None]:
            self.before_snapshot_copy(step)
            return self.snapshot.copy(fragments, ready)

        self.pending = PendingSave.start(step, copy, lambda buffers: self._write(step, fragments, buffers, small,
                                                                                  placement, started))
        self.pending.blocked = time.perf_counter() - started

    def wait_for_snapshot(self) -> None:
        """Returns once the save in flight, if any, has copied its snapshot: from then on the optimizer may
        change the weights and moments again. The training loop calls it right before the optimizer step."""
        if self.pending is not None and self.pending.wait_for_copy():
            self._print_blocked(self.pending.step, self.pending.blocked)

    def wait(self) -> None:
        """Waits for the save in flight; raises what it raised."""
        self.wait_for_snapshot()
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.thread.join()
        if pending.error is not None:
            raise CheckpointError(f"saving the checkpoint of step {pending.step} failed") from pending.error

    def _print_blocked(self, step: int, seconds: float) -> None:
        if self.rank == 0:  # a fixed form: benchmarks/checkpoint.py reads it
            say(f"checkpoint step {step} blocked training {seconds:.3f} s")

    def _own_data_parallel_group(self, mine: list[int]):
        """A gloo group over the ranks `mine` (those ZeRO partitions this rank's state over). new_group is
        collective: every rank creates every such group, in the same order."""
        everyone: list[list[int]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(everyone, mine, group=self.group)
        own = None
        for ranks in sorted({tuple(r) for r in everyone}):
            group = dist.new_group(list(ranks), backend="gloo")
            if self.rank in ranks:
                own = group
        return own

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {f"rng.rank{self.rank}": torch.get_rng_state()}
        if torch.cuda.is_available():
            states[f"rng.cuda.rank{self.rank}"] = torch.cuda.get_rng_state()
        return states

    def _gather(self, fragments: list[Fragment], buffers: list[torch.Tensor | None],
                small: dict[str, torch.Tensor]) -> dict[str, object]:
        """The snapshot at global shapes (background thread): each tensor summed over the data-parallel group
        from the ranks' slices, zeros elsewhere (what `safe_get_full_*` computes)."""
        state: dict[str, object] = dict(small)
        alone = dist.get_world_size(self.dp_group) == 1
        for fragment, buffer in zip(fragments, buffers, strict=True):
            if alone and buffer is not None and buffer.numel() == fragment.shape.numel():
                full = buffer.view(fragment.shape)  # written before the next snapshot reuses it
            else:
                full = torch.zeros(fragment.shape.numel(), dtype=torch.float32)
                if buffer is not None:
                    full.narrow(0, fragment.start, buffer.numel()).copy_(buffer)
                dist.all_reduce(full, group=self.dp_group)
                full = full.view(fragment.shape)
            state[state_key(fragment.kind, fragment.name)] = self._global(full, fragment.name)
        return state

    def _write(self, step: int, fragments: list[Fragment], buffers: list[torch.Tensor | None],
               small: dict[str, torch.Tensor], placement: dict | None, started: float) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._gather(fragments, buffers, small)
        directory = step_dir(self.root, step)
        if self.rank == 0:
            # A torn save at this step from an earlier attempt, or a checkpoint rejected as corrupt: replaced.
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        dist.barrier(group=self.group)
        writing = time.perf_counter()
        writer = RawFileWriter(directory, threads=WRITER_THREADS)
        dcp.save(state, storage_writer=writer, process_group=self.group)
        self.on_shards_written(step)
        hashing = time.perf_counter()
        mine = dict(writer.files)  # this rank's shard files, hashed as they were written
        if self.rank == 0:  # and DCP's index, which the coordinator wrote before dcp.save returned on any rank
            mine[".metadata"] = {"size": (directory / ".metadata").stat().st_size,
                                 "sha256": sha256_file(directory / ".metadata")}
        gathered: list[tuple[dict, dict | None]] = [({}, None) for _ in range(self.world_size)]
        dist.all_gather_object(gathered, (mine, placement), group=self.group)
        if self.rank == 0:
            placements = {str(rank): record for rank, (_, record) in enumerate(gathered) if record is not None}
            manifest = Manifest(step=step, samples=step * self.global_batch_size, tp=self.dims.tp,
                                pp=self.dims.pp, dp=self.dims.dp, commit_time=time.time(),
                                parametrization=self.parametrization,
                                files={k: v for files, _ in gathered for k, v in files.items()},
                                offload={"ranks": placements} if placements else None)
            manifest.write(directory)
            done = time.perf_counter()
            # One line per commit, in a fixed form: benchmarks/checkpoint.py reads it.
            say(f"checkpoint step {step} committed: {manifest.size_bytes} bytes in {done - started:.3f} s "
                  f"(snapshot+wait {writing - started:.3f} s, write {hashing - writing:.3f} s, checksums "
                  f"{done - hashing:.3f} s)")
            self.report("COMMITTED", step, manifest, str(directory), "")
            keep, removed = apply_retention(self.root, step, self.keep_last, self.keep_every)
            for old_step, old_manifest, old_directory in removed:
                self.report("REMOVED", old_step, old_manifest, str(old_directory), f"retention keeps {sorted(keep)}")
        dist.barrier(group=self.group)

    # -- loading --------------------------------------------------------------------------------------------

    def restore(self) -> int:
        """Loads the newest committed checkpoint that passes its checks; returns its step (0: none)."""
        for step in committed_steps(self.root):
            directory = step_dir(self.root, step)
            started = time.perf_counter()
            problem = self._verify(directory)
            if problem is None:
                manifest = Manifest.read(directory)
                # Weights trained under one parametrization are not a valid start under another (their scales
                # and learning rates differ): refused, not skipped for an older checkpoint of the same run.
                mismatch = parametrization_mismatch(manifest.parametrization, self.parametrization)
                if mismatch is not None:
                    raise CheckpointError(f"cannot resume from {directory}: {mismatch}; resuming under a different "
                                          "parametrization is refused (start from an empty checkpoint directory)")
                loading = time.perf_counter()
                self._load(directory, manifest)
                if self.rank == 0:
                    written, now = manifest.layout, (self.dims.tp, self.dims.pp, self.dims.dp)
                    how = "same layout" if written == now else "reshaped"
                    self.report("RESTORED", step, manifest, str(directory),
                                f"written at tp={written[0]} pp={written[1]} dp={written[2]}, loaded at "
                                f"tp={now[0]} pp={now[1]} dp={now[2]} ({how}) in {time.perf_counter() - started:.3f}"
                                f" s (checksums {loading - started:.3f} s, load {time.perf_counter() - loading:.3f} s)")
                return step
            if self.rank == 0:
                say(f"roundhouse trainer: checkpoint {directory} rejected: {problem}; trying an older one",
                      file=sys.stderr)
                try:
                    manifest = Manifest.read(directory)
                except CheckpointError:
                    manifest = None
                self.report("REJECTED", step, manifest, str(directory), problem)
        return 0

    def _verify(self, directory: Path) -> str | None:
        """Every rank checks a share of the files; the first problem any rank found, or None."""
        try:
            manifest = Manifest.read(directory)
            names = sorted(manifest.files)
            problems = [p for name in names[self.rank::self.world_size]
                        if (p := check_file(directory, name, manifest.files[name])) is not None]
            if ".metadata" not in manifest.files:
                problems.append("the manifest lists no .metadata")
        except CheckpointError as exc:
            problems = [str(exc)]
        gathered: list[list[str]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, problems)
        found = [p for part in gathered for p in part]
        return found[0] if found else None

    def _load(self, directory: Path, manifest: Manifest) -> None:
        import torch.distributed.checkpoint as dcp

        same_layout = manifest.layout == (self.dims.tp, self.dims.pp, self.dims.dp)
        state: dict[str, object] = {}
        for name, shape in self.state.parameter_shapes().items():  # read into host memory, then handed over
            for kind in KINDS:
                state[state_key(kind, name)] = self._global(torch.empty(shape, dtype=torch.float32), name)
        state["optim.step"] = torch.zeros((), dtype=torch.float32)
        if same_layout:  # the RNG states this checkpoint has for this rank (a CPU run's has no CUDA state)
            saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
            state.update({key: value for key, value in self._rng_states().items() if key in saved})
        dcp.load(state, storage_reader=READERS[manifest.format](directory), process_group=self.group)

        self.state.load({(kind, name): state[state_key(kind, name)].to_local()
                         for name in self.state.parameter_shapes() for kind in KINDS}, state["optim.step"])
        recorded = (manifest.offload or {}).get("ranks", {}).get(str(self.rank))
        if same_layout and recorded is not None and self.placement is not None:
            problem = self.placement.restore(recorded)
            if problem is not None:
                say(f"rank {self.rank}: offload placement of {directory} not reused ({problem}); planning "
                      "afresh")
        if f"rng.rank{self.rank}" in state:
            torch.set_rng_state(state[f"rng.rank{self.rank}"])
        if f"rng.cuda.rank{self.rank}" in state:
            torch.cuda.set_rng_state(state[f"rng.cuda.rank{self.rank}"])

    # -- helpers --------------------------------------------------------------------------------------------

    def _global(self, local: torch.Tensor, name: str):
        """This rank's slice of the parameter `name` as a DTensor with its global shape."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        dim = self.table[name].shard_dim
        placements = (Replicate(), Shard(dim) if dim is not None else Replicate())
        return DTensor.from_local(local.detach(), self.stage_mesh, placements, run_check=False)
