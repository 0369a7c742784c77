"""What benchmarks/offload.py (GPU) and benchmarks/offload_cpu.py share: one process as a one-rank DeepSpeed
world, benchmarks/plain_gpt.py's GPT in a ZeRO-1 engine with the optimizer of each mode, real text (CPython's
own sources, on every machine), and a timed training loop.

Modes:
  none         ZeRO-1, the optimizer state on the accelerator, torch's fused AdamW
  cpu          ZeRO-1 CPU offload with torch's fused AdamW on the host (DeepSpeed's offload path with a fused
               CPU Adam: the baseline to beat)
  interleaved  ZeRO-1 CPU offload with offload.HybridAdam on `device`, placement from a planner
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

import torch

from offload import HybridAdam, ds_config_for, merge_ds_config

BETAS = (0.9, 0.95)
EPS = 1e-8


def init_single_rank() -> None:
    """A one-rank process group (NCCL on a GPU, gloo on a CPU)."""
    import deepspeed
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_gpt(layers: int, hidden: int, heads: int, seq: int, seed: int = 5):
    from benchmarks import plain_gpt
    from trainers.model import GPTConfig
    model = plain_gpt.GPT(GPTConfig(layers=layers, hidden_size=hidden, heads=heads, seq_length=seq, vocab_size=256))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def param_groups(model, weight_decay: float = 0.1):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def corpus(seq: int, sequences: int, seed: int = 0) -> torch.Tensor:
    """`sequences` rows of seq + 1 bytes of CPython's standard library sources (a real, always-present text)."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    data = torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (sequences,), generator=g)
    return torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


def build_engine(mode: str, model, *, micro_batch: int, global_batch: int, bf16: bool, lr: float = 1e-4,
                 device=None, subgroup_size: int = 10_000_000, planner=None):
    import deepspeed
    config = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro_batch,
              "gradient_accumulation_steps": global_batch // micro_batch, "zero_optimization": {"stage": 1},
              "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if bf16:
        config["bf16"] = {"enabled": True}
    groups = param_groups(model)
    if mode == "none":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, fused=True)
    elif mode == "cpu":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, fused=True)
        config = merge_ds_config(config, ds_config_for("cpu"))
    elif mode == "interleaved":
        optimizer = HybridAdam(groups, lr=lr, betas=BETAS, eps=EPS, device=device, subgroup_size=subgroup_size,
                               planner=planner)
        config = merge_ds_config(config, ds_config_for("interleaved"))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if torch.cuda.is_available():
        model = model.cuda()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train(engine, tokens: torch.Tensor, steps: int, micro_batch: int, global_batch: int, first_row: int = 0):
    """`steps` optimizer steps over consecutive rows of `tokens`. Returns per step: loss (mean over the
    global batch), step seconds, and the seconds of the engine.step() that ran the update."""
    dev = next(engine.module.parameters()).device
    losses, step_s, update_s = [], [], []
    row = first_row
    prefetch = getattr(getattr(engine.optimizer, "optimizer", None), "prefetch", None)
    for _ in range(steps):
        _sync()
        started = time.perf_counter()
        if prefetch is not None:
            prefetch()  # HybridAdam: the first device subgroups come in while forward and backward run
        total = 0.0
        for _ in range(global_batch // micro_batch):
            batch = tokens[row:row + micro_batch].to(dev)
            row += micro_batch
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            _sync()
            before_step = time.perf_counter()
            engine.step()
            _sync()
            after_step = time.perf_counter()
            total += float(loss.detach()) * micro_batch / global_batch
        losses.append(total)
        step_s.append(time.perf_counter() - started)
        update_s.append(after_step - before_step)  # the last micro-batch's step() is the boundary
    return losses, step_s, update_s


def median_and_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4g} (min {min(values):.4g}, max {max(values):.4g}, n={len(values)})"
