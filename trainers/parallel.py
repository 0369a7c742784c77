"""How the world is split: tensor × pipeline × data parallel, and this rank's place in it.

Rank order, the same for megatron-core and DeepSpeed: tensor parallel varies fastest, then data parallel,
then pipeline parallel:  rank = (pp_rank * dp + dp_rank) * tp + tp_rank.  `setup` checks at start-up that
both libraries really agree, since a disagreement would silently train nonsense."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = timedelta(seconds=120)
SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op, as torch's extension loader names it


class LayoutError(RuntimeError):
    """The libraries disagree on where this rank sits, or the world does not fit the layout."""


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def rank_of(self, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} (rank {self.rank}: tp {self.tp_rank}, " \
               f"pp {self.pp_rank}, dp {self.dp_rank})"


def startup_phase() -> str:
    """What the rank does in `setup`, for its status: joining its peers, and on CPU loading DeepSpeed's CPU
    communication op, which `make install` builds into the venv. A rank that finds it missing builds it (once),
    and one that finds another build's lock waits: both take minutes, so the rank says so."""
    if torch.cuda.is_available():
        return "joining its peers"
    ops = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / SHM_OP
    if (ops / "lock").exists():
        return "waiting on another build of DeepSpeed's CPU comm op"
    if not (ops / f"{SHM_OP}.so").exists():
        return "building DeepSpeed's CPU comm op (once per venv)"
    return "joining its peers"


def use_prebuilt_ops_read_only() -> Path | None:
    """Lets DeepSpeed load its prebuilt CPU comm op from a directory this rank cannot write (an image's,
    under readOnlyRootFilesystem, or one owned by another user): torch's extension loader takes a lock file
    and rewrites its build file in the op's directory even when the op is built, an OSError there. The rank
    then loads it from a copy in its temporary directory (TORCH_EXTENSIONS_DIR points there; the copy keeps
    the files' times, so nothing is rebuilt) and the prebuilt directory is only read. Returns the copy's root,
    or None where nothing had to be done (no prebuilt op: it is built in place, once; a writable one)."""
    ops = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / SHM_OP
    if not (ops / f"{SHM_OP}.so").exists() or os.access(ops, os.W_OK):
        return None
    copy = Path(tempfile.mkdtemp(prefix="roundhouse-ops-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    shutil.copytree(ops, copy / SHM_OP, ignore=shutil.ignore_patterns("lock"))
    for path in [copy, *copy.rglob("*")]:  # a read-only original's modes came along
        path.chmod(path.stat().st_mode | 0o200)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(copy)
    return copy


def setup(dims: ParallelDims, master_addr: str, master_port: int, local_rank: int):
    """Starts torch.distributed (gloo on CPU, NCCL on GPU), megatron-core's tensor-parallel groups and
    DeepSpeed's topology; returns the topology after checking the two agree on this rank's coordinates."""
    import deepspeed
    import torch
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # DeepSpeed reads these from the environment rather than from the process group.
    for name, value in (("MASTER_ADDR", master_addr), ("MASTER_PORT", master_port), ("RANK", dims.rank),
                        ("WORLD_SIZE", dims.world_size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # before NCCL starts: one GPU per rank, by its local rank
    else:
        use_prebuilt_ops_read_only()  # before DeepSpeed loads its CPU comm op
    # Under torchrun (several ranks per pod) its agent already serves the store at MASTER_ADDR:MASTER_PORT, and
    # env:// joins it (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 serves it.
    init_method = "env://" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") else f"tcp://{master_addr}:{master_port}"
    dist.init_process_group(backend, init_method=init_method, rank=dims.rank, world_size=dims.world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group above
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp,
                                             pipeline_model_parallel_size=dims.pp)
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    check_rank_order(dims, topology)
    return topology


def check_rank_order(dims: ParallelDims, topology) -> None:
    from megatron.core import parallel_state

    coordinate = topology.get_coord(dims.rank)
    seen = {
        "megatron": (parallel_state.get_tensor_model_parallel_rank(),
                     parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank()),
        "deepspeed": (coordinate.model, coordinate.pipe, coordinate.data),
        "roundhouse": (dims.tp_rank, dims.pp_rank, dims.dp_rank),
    }
    if len(set(seen.values())) != 1:
        raise LayoutError(f"rank {dims.rank}: the libraries disagree on its (tp, pp, dp) coordinates: {seen}")


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
