"""Checkpoints that reshape: save at one (tp, pp, dp) layout, load at any other valid one, resume exactly.

Format: one PyTorch distributed checkpoint (DCP) per step in `<root>/step-<step>/`, plus `manifest.json`. DCP
plans, deduplicates and indexes it (`.metadata`); the shard files hold each tensor's raw bytes, written and
read by trainers.checkpoint_storage.

- Every tensor is stored at its global name and global shape. A tensor-parallel parameter is a DTensor on
  this pipeline stage's (dp, tp) mesh, `Shard(dim)` over tp and `Replicate()` over dp, so DCP writes each
  slice once (data-parallel replicas are deduplicated) and a reader at another tp reads the slices it needs.
  Pipeline layers are keyed by their global index ("blocks.3...."), so a reader at another pp simply asks
  for the layers its stage holds.
- Contents: `model.<name>` (the fp32 master weights), `optim.exp_avg.<name>` and `optim.exp_avg_sq.<name>`
  (Adam's moments, gathered over ZeRO's data-parallel partitions as DeepSpeed's `safe_get_full_*` do),
  `optim.step`, and each rank's RNG states (`rng.rank<r>`, and `rng.cuda.rank<r>` on GPUs; restored only at
  the same layout). The learning rate and the data position are functions of the step (trainers.schedule,
  trainers.data), so the step is all they need.
- The manifest (step, samples consumed, layout, every file's size and SHA-256, computed as the file was
  written) is written last, atomically:
  a temporary name, fsync, rename, fsync of the directory. A directory without a manifest is not a
  checkpoint: no reader looks at it, and the next save at that step replaces it.

Saving copies this rank's ZeRO partition of the state into buffers kept from save to save (one copy, no
allocation, no collective), then gathers each tensor over the data-parallel group and writes it, over process
groups of its own. An asynchronous save does all of it in a background thread: the weights and moments change
only in the optimizer's step, so the copy overlaps the next step's forward and backward, and that step's
optimizer waits for it (a pre-step hook); training waits for nothing else. At most one save is in flight: the
buffers (1/dp of the state) and the gathered tensors are the only extra memory.

Loading verifies the checksums of the newest committed checkpoint (each rank hashes a share of the files); a
torn or corrupt one is reported and the next older one is tried."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from trainers.checkpoint_storage import RawFileReader, RawFileWriter
from trainers.model import SHARD_DIM
from trainers.parallel import ParallelDims

MANIFEST = "manifest.json"
FORMAT = "roundhouse-dcp-2"  # DCP with raw tensor bytes (trainers.checkpoint_storage)
# Each format this version reads, and DCP's storage reader for it: "roundhouse-dcp-1" was DCP's own torch.save
# files, kept readable so a job that was checkpointed before an upgrade resumes after it.
READERS = {FORMAT: RawFileReader, "roundhouse-dcp-1": FileSystemReader}
OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")
HASH_BLOCK = 8 << 20
# Each rank writes its shards as this many files, by as many threads, each hashing its file's bytes as it
# writes them: SHA-256 and file writes release the GIL, so two threads keep two cores and the disk busy.
WRITER_THREADS = 2


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


# -- the parameters, by global name ---------------------------------------------------------------------------

def named_parameters(module: torch.nn.Module) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(global name, name within its pipeline layer, parameter) for every parameter this rank holds."""
    out = []
    for layer in module.modules():
        prefix = getattr(layer, "global_prefix", None)
        if prefix is None:
            continue
        for name, param in layer.named_parameters():
            out.append((f"{prefix}.{name}", name, param))
    return sorted(out, key=lambda item: item[0])  # every rank of a stage walks them in the same order


@dataclass
class Fragment:
    """This rank's slice of one parameter's fp32 weight or Adam moment in ZeRO-1's flat partition: elements
    [start, start + source.numel()) of the flattened parameter, copied from `source` (the live state) into
    `buffer` by the snapshot."""

    key: str  # "model.<global name>" or "optim.<moment>.<global name>"
    name: str  # within its pipeline layer (which dimension tensor parallelism splits)
    shape: torch.Size
    start: int
    source: torch.Tensor | None  # None: the parameter lies wholly in other data-parallel ranks' partitions
    buffer: torch.Tensor | None = None


@dataclass
class PendingSave:
    step: int
    thread: threading.Thread
    copied: threading.Event  # the snapshot is taken: the optimizer may change the state again
    blocked: float = 0.0  # seconds the training thread has waited for this save
    settled: bool = False  # its blocked time is final (and printed)
    error: BaseException | None = None


class Checkpointer:
    """Saves and restores one rank's part of the training state. Every method is collective: all ranks call
    it, in the same order."""

    def __init__(self, root: Path, engine, dims: ParallelDims, *, global_batch_size: int, keep_last: int = 2,
                 keep_every: int = 0, report: Callable[..., None] | None = None,
                 on_shards_written: Callable[[int], None] | None = None,
                 before_snapshot_copy: Callable[[int], None] | None = None):
        from torch.distributed.device_mesh import init_device_mesh

        self.root = root
        self.engine = engine
        self.dims = dims
        self.global_batch_size = global_batch_size
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.report = report or (lambda *args, **kwargs: None)
        self.on_shards_written = on_shards_written or (lambda step: None)
        self.before_snapshot_copy = before_snapshot_copy or (lambda step: None)  # a test hook
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # The whole world as (pp, dp, tp), in the rank order of trainers.parallel; each stage's tensors live
        # on its (dp, tp) slice. On the CPU even with GPUs: checkpoints are staged in host memory (the snapshot
        # copies the GPU state there), and the mesh only describes where each slice belongs.
        world = init_device_mesh("cpu", (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
        self.stage_mesh = world["dp", "tp"]
        # Saves run in a background thread: their collectives need groups that training never uses.
        self.group = dist.new_group(backend="gloo")
        self.dp_group = self._own_data_parallel_group()
        self.buffers: dict[str, torch.Tensor] = {}  # snapshot buffers by key, reused by every save
        self.pending: PendingSave | None = None
        # The fp32 weights and Adam's moments change only in the optimizer's step, so an asynchronous save copies
        # them while the next step's forward and backward run, and that step's optimizer waits for the copy.
        self._zero_optimizer().optimizer.register_step_pre_hook(self._before_optimizer_step)
        self.copy_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, step: int, blocking: bool) -> None:
        """Snapshots the state after `step` and writes it: at once, or (not `blocking`) in the background, the
        snapshot's copy overlapping the next step until that step's optimizer. Rank 0 prints how long training
        was blocked once that is known."""
        started = time.perf_counter()
        self.wait()  # one save in flight at most: bounded memory
        fragments, state = self._prepare_snapshot()
        ready = None
        if self.copy_stream is not None:  # the copy (on its own stream) starts once the GPU has done this step
            ready = torch.cuda.Event()
            ready.record()
        if blocking:
            self.before_snapshot_copy(step)
            self._copy(fragments, ready)
            self._write(step, fragments, state, started)
            self._print_blocked(step, time.perf_counter() - started)
            return
        pending = PendingSave(step, threading.Thread(
            target=lambda: self._save_in_background(pending, fragments, state, ready, started),
            name=f"checkpoint-{step}", daemon=True), threading.Event())
        self.pending = pending
        pending.thread.start()
        pending.blocked = time.perf_counter() - started

    def wait(self) -> None:
        """Waits for the save in flight; raises what it raised."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        self._wait_for_snapshot(pending)
        pending.thread.join()
        if pending.error is not None:
            raise CheckpointError(f"saving the checkpoint of step {pending.step} failed") from pending.error

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """The optimizer's pre-step hook: the state may change only once the snapshot in flight is taken."""
        if self.pending is not None:
            self._wait_for_snapshot(self.pending)

    def _wait_for_snapshot(self, pending: PendingSave) -> None:
        """Waits (once per save) for its snapshot's copy; the wait is blocked time, which is then final."""
        if pending.settled:
            return
        waited = time.perf_counter()
        pending.copied.wait()
        pending.blocked += time.perf_counter() - waited
        pending.settled = True
        self._print_blocked(pending.step, pending.blocked)

    def _print_blocked(self, step: int, seconds: float) -> None:
        if self.rank == 0:  # a fixed form: benchmarks/checkpoint.py reads it
            print(f"checkpoint step {step} blocked training {seconds:.3f} s", flush=True)

    def _save_in_background(self, pending: PendingSave, fragments: list[Fragment], state: dict,
                            ready, started: float) -> None:
        try:
            try:
                self.before_snapshot_copy(pending.step)
                self._copy(fragments, ready)
            finally:
                pending.copied.set()  # also on failure: the optimizer must not wait forever
            self._write(pending.step, fragments, state, started)
        except BaseException as exc:  # surfaced by wait() on the training thread
            pending.error = exc

    def _own_data_parallel_group(self):
        """A gloo group over the same ranks as ZeRO's data-parallel group (new_group is collective: every rank
        creates every such group, in the same order)."""
        mine = dist.get_process_group_ranks(self._zero_optimizer().dp_process_group)
        everyone: list[list[int]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(everyone, mine, group=self.group)
        own = None
        for ranks in sorted({tuple(r) for r in everyone}):
            group = dist.new_group(list(ranks), backend="gloo")
            if self.rank in ranks:
                own = group
        return own

    def _prepare_snapshot(self) -> tuple[list[Fragment], dict[str, torch.Tensor]]:
        """This rank's partition of the weights and moments, as views of the live state (the mapping from
        parameter to partition slice is DeepSpeed's `_hp_mapping`, which its `safe_get_full_*` read too), and
        the small rest of the state, taken now."""
        self._link_optimizer_state()
        fragments = []
        for global_name, name, param in named_parameters(self.engine.module):
            mapping = param._hp_mapping
            for key, moment in ((f"model.{global_name}", None),
                                *((f"optim.{m}.{global_name}", m) for m in OPTIMIZER_MOMENTS)):
                if mapping is None:
                    fragments.append(Fragment(key, name, param.shape, 0, None))
                else:
                    fragments.append(Fragment(key, name, param.shape, mapping.lp_fragment_address.start,
                                              mapping.get_hp_fragment(moment)))
        return fragments, {"optim.step": self._optimizer_step(), **self._rng_states()}

    def _copy(self, fragments: list[Fragment], ready=None) -> None:
        """Copies each fragment into its buffer, kept from save to save (one copy, no allocation after the first
        save, no collective); on GPUs, on a stream of its own once `ready`."""
        for fragment in fragments:
            source = fragment.source
            if source is None:
                continue
            buffer = self.buffers.get(fragment.key)
            if buffer is None or buffer.shape != source.shape:
                # Pinned host memory on GPUs: the copy runs at full PCIe speed, and all that follows (the
                # gather, the write) works on host memory, off the GPU.
                buffer = self.buffers[fragment.key] = torch.empty(source.shape, dtype=source.dtype,
                                                                  pin_memory=source.is_cuda)
            fragment.buffer = buffer
        if self.copy_stream is None:
            for fragment in fragments:
                if fragment.buffer is not None:
                    fragment.buffer.copy_(fragment.source)
            return
        with torch.cuda.stream(self.copy_stream):
            if ready is not None:
                self.copy_stream.wait_event(ready)
            for fragment in fragments:
                if fragment.buffer is not None:
                    fragment.buffer.copy_(fragment.source, non_blocking=True)
        self.copy_stream.synchronize()  # the buffers hold the state before the optimizer may change it

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {f"rng.rank{self.rank}": torch.get_rng_state()}
        if torch.cuda.is_available():
            states[f"rng.cuda.rank{self.rank}"] = torch.cuda.get_rng_state()
        return states

    def _gather(self, fragments: list[Fragment], small: dict[str, torch.Tensor]) -> dict[str, object]:
        """The snapshot at global shapes (background thread): each tensor summed over the data-parallel group
        from the ranks' slices, zeros elsewhere (what `safe_get_full_*` computes)."""
        state: dict[str, object] = dict(small)
        alone = dist.get_world_size(self.dp_group) == 1
        for fragment in fragments:
            if alone and fragment.buffer is not None and fragment.buffer.numel() == fragment.shape.numel():
                full = fragment.buffer.view(fragment.shape)  # written before the next snapshot reuses it
            else:
                full = torch.zeros(fragment.shape.numel(), dtype=torch.float32)
                if fragment.buffer is not None:
                    full.narrow(0, fragment.start, fragment.buffer.numel()).copy_(fragment.buffer)
                dist.all_reduce(full, group=self.dp_group)
                full = full.view(fragment.shape)
            state[fragment.key] = self._global(full, fragment.name)
        return state

    def _write(self, step: int, fragments: list[Fragment], small: dict[str, torch.Tensor], started: float) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._gather(fragments, small)
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
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, mine, group=self.group)
        if self.rank == 0:
            manifest = Manifest(step=step, samples=step * self.global_batch_size, tp=self.dims.tp,
                                pp=self.dims.pp, dp=self.dims.dp, commit_time=time.time(),
                                files={k: v for part in gathered for k, v in part.items()})
            manifest.write(directory)
            done = time.perf_counter()
            # One line per commit, in a fixed form: benchmarks/checkpoint.py reads it.
            print(f"checkpoint step {step} committed: {manifest.size_bytes} bytes in {done - started:.3f} s "
                  f"(snapshot+wait {writing - started:.3f} s, write {hashing - writing:.3f} s, checksums "
                  f"{done - hashing:.3f} s)", flush=True)
            self.report("COMMITTED", step, manifest, str(directory), "")
            self._apply_retention(step)
        dist.barrier(group=self.group)

    def _apply_retention(self, newest: int) -> None:
        steps = committed_steps(self.root)
        keep = retained(steps, self.keep_last, self.keep_every)
        for step in steps:
            if step in keep or step > newest:
                continue
            directory = step_dir(self.root, step)
            manifest = Manifest.read(directory)
            (directory / MANIFEST).unlink()  # uncommitted first, so no reader sees it half deleted
            shutil.rmtree(directory, ignore_errors=True)
            self.report("REMOVED", step, manifest, str(directory), f"retention keeps {sorted(keep)}")

    # -- loading --------------------------------------------------------------------------------------------

    def restore(self) -> int:
        """Loads the newest committed checkpoint that passes its checks; returns its step (0: none)."""
        for step in committed_steps(self.root):
            directory = step_dir(self.root, step)
            started = time.perf_counter()
            problem = self._verify(directory)
            if problem is None:
                manifest = Manifest.read(directory)
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
                print(f"roundhouse trainer: checkpoint {directory} rejected: {problem}; trying an older one",
                      file=sys.stderr, flush=True)
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
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        same_layout = manifest.layout == (self.dims.tp, self.dims.pp, self.dims.dp)
        parameters = named_parameters(self.engine.module)
        state: dict[str, object] = {}
        for global_name, name, param in parameters:  # read into host memory, then copied to the parameters
            state[f"model.{global_name}"] = self._global(torch.empty(param.shape, dtype=torch.float32), name)
            for moment in OPTIMIZER_MOMENTS:
                state[f"optim.{moment}.{global_name}"] = self._global(
                    torch.empty(param.shape, dtype=torch.float32), name)
        state["optim.step"] = torch.zeros((), dtype=torch.float32)
        if same_layout:  # the RNG states this checkpoint has for this rank (a CPU run's has no CUDA state)
            saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
            state.update({key: value for key, value in self._rng_states().items() if key in saved})
        dcp.load(state, storage_reader=READERS[manifest.format](directory), process_group=self.group)

        optimizer_step = state["optim.step"]
        self._initialise_optimizer_state(optimizer_step)
        with torch.no_grad():
            for global_name, _, param in parameters:
                weight = state[f"model.{global_name}"].to_local()
                param.copy_(weight)  # the module's copy (what forward uses) ...
                safe_set_full_fp32_param(param, weight)  # ... and ZeRO's fp32 master
                for moment in OPTIMIZER_MOMENTS:
                    safe_set_full_optimizer_state(param, state[f"optim.{moment}.{global_name}"].to_local(), moment)
        if f"rng.rank{self.rank}" in state:
            torch.set_rng_state(state[f"rng.rank{self.rank}"])
        if f"rng.cuda.rank{self.rank}" in state:
            torch.cuda.set_rng_state(state[f"rng.cuda.rank{self.rank}"])
        self.engine.global_steps = manifest.step
        self.engine.global_samples = manifest.samples

    # -- helpers --------------------------------------------------------------------------------------------

    def _global(self, local: torch.Tensor, name: str):
        """This rank's slice as a DTensor with the parameter's global shape."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        dim = SHARD_DIM.get(name)
        placements = (Replicate(), Shard(dim) if dim is not None else Replicate())
        return DTensor.from_local(local.detach(), self.stage_mesh, placements, run_check=False)

    def _zero_optimizer(self):
        return self.engine.optimizer  # DeepSpeed's ZeRO stage 1 optimizer, wrapping torch's AdamW

    def _optimizer_step(self) -> torch.Tensor:
        """Adam's step count (the same for every partition): it sets the bias corrections."""
        zero = self._zero_optimizer()
        for flat in zero.single_partition_of_fp32_groups:
            state = zero.optimizer.state.get(flat)
            if state and "step" in state:
                return state["step"].detach().to("cpu", torch.float32).reshape(()).clone()
        return torch.zeros((), dtype=torch.float32)

    def _initialise_optimizer_state(self, step: torch.Tensor) -> None:
        """AdamW creates its state on the first step, and DeepSpeed links each parameter to its slice of that
        state only then; a resumed run needs the state before that step, so it is created here, as AdamW
        would, and linked the same way."""
        zero = self._zero_optimizer()
        for flat in zero.single_partition_of_fp32_groups:
            state = zero.optimizer.state[flat]
            state["step"] = step.detach().clone()
            for moment in OPTIMIZER_MOMENTS:
                state.setdefault(moment, torch.zeros_like(flat, memory_format=torch.preserve_format))
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """Points each parameter at its slice of the optimizer state, for `safe_get/set_full_optimizer_state`.

        DeepSpeed links them once, right after the first parameter group's first step, when the other groups
        have no state yet; so the link is made again here, once every group's state exists."""
        zero = self._zero_optimizer()
        if all(zero.optimizer.state.get(flat) for flat in zero.single_partition_of_fp32_groups):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
