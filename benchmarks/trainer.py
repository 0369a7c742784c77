"""The 3D trainer's speed on this machine.

1. Overhead: tokens/s of `python -m trainers` at layout (1, 1, 1) (megatron-core layers in a DeepSpeed pipeline
   engine with ZeRO-1) against a plain single-process PyTorch GPT of the same size, batch and data
   (benchmarks/plain_gpt.py, torch AdamW), measured in the same run. Goal: at least 0.85x.
2. Scaling: tokens/s and peak memory (RSS) per rank for 1, 2, 4 and 8 ranks over the layouts
   (1,1,1) (2,1,1) (1,2,1) (1,1,2) (2,2,1) (2,2,2), same model and global batch.

Tokens/s is the median over the measured steps (the first steps, warm-up, are left out). The overhead ratio
is measured --repeats times (default 5), plain and trainer interleaved so both see the same machine; the
median ratio decides, printed with its spread (min-max).

    python -m benchmarks.trainer [--steps 12] [--repeats 5] [--skip-scaling]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import plain_gpt

from orchestrator.launcher.local import free_port
from contract.spec import parse_spec
from trainers.data import TextData
from trainers.optim import set_lr
from trainers.schedule import lr_at

WARMUP_STEPS = 3
STEP_LINE = re.compile(r"^step (\d+)/\d+ loss [\d.]+ lr \S+ tok/s (\d+)", re.M)
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 2, 2)]


def spec_for(tp: int, pp: int, dp: int, steps: int, micro_batch_size: int):
    return parse_spec({
        "name": "bench", "model": {"layers": 4, "hidden_size": 256, "heads": 8, "seq_length": 128},
        "parallelism": {"tp": tp, "pp": pp, "dp": dp},
        "training": {"steps": steps, "global_batch_size": 16, "micro_batch_size": micro_batch_size,
                     "learning_rate": 1e-3, "warmup_steps": 0, "seed": 5}})


def run_trainer(spec, directory: Path) -> tuple[float, list[int]]:
    """Runs every rank of the spec's layout; returns rank 0's median tokens/s and each rank's peak RSS."""
    spec_file = directory / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    port, world = free_port(), spec.world_size
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROUNDHOUSE_", "RH_"))}
    procs = []
    for rank in range(world):
        env = {**base, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ROUNDHOUSE_SPEC_FILE": str(spec_file)}
        out = open(directory / f"rank-{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "trainers"], env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
    peaks = []
    for rank, proc in enumerate(procs):
        _, status, usage = os.wait4(proc.pid, 0)  # per-process rusage: ru_maxrss is this rank's peak, in KiB
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} failed: see {directory}/rank-{rank}.log")
        peaks.append(usage.ru_maxrss * 1024)
    rates = [int(m.group(2)) for m in STEP_LINE.finditer((directory / "rank-0.log").read_text())
             if int(m.group(1)) > WARMUP_STEPS]
    return statistics.median(rates), peaks


def run_plain(spec) -> float:
    """The same model, batch, data and optimizer in a plain PyTorch loop; median tokens/s."""
    model = plain_gpt.build_model(spec.model, spec.training.seed)
    optimizer = plain_gpt.build_optimizer(model, spec.training)
    data = TextData.from_path(None, spec.model.seq_length, spec.training.seed)
    t = spec.training
    micro = t.global_batch_size // t.micro_batch_size
    rates = []
    for step in range(1, t.steps + 1):
        started = time.perf_counter()
        set_lr(optimizer, lr_at(step, t))
        batch = data.train_batch(step, t.global_batch_size)
        optimizer.zero_grad(set_to_none=True)
        for inputs, targets in zip(batch.inputs.split(t.micro_batch_size), batch.targets.split(t.micro_batch_size),
                                   strict=True):
            (model(inputs, targets) / micro).backward()
        optimizer.step()
        if step > WARMUP_STEPS:
            rates.append(t.global_batch_size * spec.model.seq_length / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    machine = f"{platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch " \
              f"{torch.__version__}, {torch.get_num_threads()} threads)"

    with tempfile.TemporaryDirectory() as tmp:
        spec = spec_for(1, 1, 1, args.steps, micro_batch_size=8)
        ratios, plains, trainers = [], [], []
        for repeat in range(args.repeats):
            directory = Path(tmp) / f"overhead-{repeat}"
            directory.mkdir()
            plain = run_plain(spec)
            trainer, _ = run_trainer(spec, directory)
            plains.append(plain)
            trainers.append(trainer)
            ratios.append(trainer / plain)
            print(f"repeat {repeat + 1}/{args.repeats}: plain {plain:,.0f} tok/s, trainer {trainer:,.0f} tok/s, "
                  f"{trainer / plain:.2f}x", flush=True)
        ratio = statistics.median(ratios)
        print(f"Trainer overhead at (1,1,1), layers 4, hidden 256, seq 128, global batch 16 (2 micro-batches), "
              f"{machine}, median of {args.repeats} interleaved repeats (min-max)")
        print()
        print("| run | tokens/s | vs plain PyTorch |")
        print("|---|---:|---:|")
        print(f"| plain PyTorch GPT | {statistics.median(plains):,.0f} ({min(plains):,.0f}-{max(plains):,.0f}) "
              f"| 1.00x |")
        print(f"| roundhouse trainer (1,1,1) | {statistics.median(trainers):,.0f} "
              f"({min(trainers):,.0f}-{max(trainers):,.0f}) | **{ratio:.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |")
        print(f"Goal >= 0.85x: {'met' if ratio >= 0.85 else 'NOT met'}")
        if args.skip_scaling:
            return

        print()
        print(f"Scaling over layouts, same model, global batch 16, micro-batch 2, {machine}")
        print()
        print("| layout (tp,pp,dp) | ranks | tokens/s | vs (1,1,1) | peak RSS per rank (MiB, max) |")
        print("|---|---:|---:|---:|---:|")
        base = None
        for tp, pp, dp in LAYOUTS:
            directory = Path(tmp) / f"{tp}{pp}{dp}"
            directory.mkdir()
            rate, peaks = run_trainer(spec_for(tp, pp, dp, args.steps, micro_batch_size=2), directory)
            base = base or rate
            print(f"| ({tp},{pp},{dp}) | {tp * pp * dp} | {rate:,.0f} | {rate / base:.2f}x | "
                  f"{max(peaks) / 2**20:,.0f} |", flush=True)
        print()
        print("Peak RSS includes the Python interpreter, torch, DeepSpeed and megatron-core.")


if __name__ == "__main__":
    main()
