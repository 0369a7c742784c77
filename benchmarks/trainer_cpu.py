"""The trainer's overhead in CPU time, for a machine that other work shares.

`python -m benchmarks.trainer` compares tokens per wall-clock second, which on a busy machine measures the
other work as much as the trainer. This script compares the CPU time (time.process_time) each step takes, on
one torch thread: the trainer at (1, 1, 1) (`trainers.main.main` in this process, its `forward_backward` and
`optimizer_step` timed) against the plain PyTorch GPT of benchmarks.trainer, same spec, data and optimizer.
Each side runs in its own process, the two interleaved --repeats times; per run the median over the steps
after the first 3; the ratio (plain CPU seconds per step / trainer's, so above 1 means the trainer is cheaper)
is the median over the repeats, printed with its spread. With --profile DIR, each run also writes a cProfile
(CPU time) of its measured steps there.

    python -m benchmarks.trainer_cpu [--steps 12] [--repeats 3] [--profile DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.trainer import WARMUP_STEPS, spec_for

RESULT = re.compile(r"^cpu seconds per step: ([\d.]+)$", re.M)


def measure_plain(spec, profiler: cProfile.Profile) -> list[float]:
    from benchmarks import plain_gpt
    from trainers.data import TextData
    from trainers.optim import set_lr
    from trainers.schedule import lr_at

    model = plain_gpt.build_model(spec.model, spec.training.seed)
    optimizer = plain_gpt.build_optimizer(model, spec.training)
    data = TextData.from_path(None, spec.model.seq_length, spec.training.seed)
    t = spec.training
    micro = t.global_batch_size // t.micro_batch_size
    seconds = []
    for step in range(1, t.steps + 1):
        if step == WARMUP_STEPS + 1:
            profiler.enable()
        set_lr(optimizer, lr_at(step, t))
        batch = data.train_batch(step, t.global_batch_size)
        started = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        for inputs, targets in zip(batch.inputs.split(t.micro_batch_size), batch.targets.split(t.micro_batch_size),
                                   strict=True):
            (model(inputs, targets) / micro).backward()
        optimizer.step()
        if step > WARMUP_STEPS:
            seconds.append(time.process_time() - started)
    profiler.disable()
    return seconds


def measure_trainer(spec, profiler: cProfile.Profile, directory: Path) -> list[float]:
    """The trainer's own loop, with its two step halves timed: from the start of `forward_backward` to the end
    of `optimizer_step` (the lr and the batch are set before, as in the plain loop)."""
    from orchestrator.launcher.local import free_port
    import trainers.main as trainer

    spec_file = directory / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), ROUNDHOUSE_SPEC_FILE=str(spec_file))
    seconds, state = [], {"step": 0, "started": 0.0}
    forward_backward, optimizer_step = trainer.forward_backward, trainer.optimizer_step

    def timed_forward_backward(engine, batches):
        state["step"] += 1
        if state["step"] == WARMUP_STEPS + 1:
            profiler.enable()
        state["started"] = time.process_time()
        return forward_backward(engine, batches)

    def timed_optimizer_step(engine):
        optimizer_step(engine)
        if state["step"] > WARMUP_STEPS:
            seconds.append(time.process_time() - state["started"])

    trainer.forward_backward, trainer.optimizer_step = timed_forward_backward, timed_optimizer_step
    code = trainer.main()
    profiler.disable()
    if code != 0:
        raise RuntimeError(f"the trainer exited {code}")
    return seconds


def one(which: str, steps: int, profile: str | None) -> None:
    torch.set_num_threads(1)  # CPU time of one thread: spinning threads would count too
    spec = spec_for(1, 1, 1, steps, micro_batch_size=8)
    profiler = cProfile.Profile(time.process_time)
    with tempfile.TemporaryDirectory() as tmp:
        seconds = measure_plain(spec, profiler) if which == "plain" else measure_trainer(spec, profiler, Path(tmp))
    if profile:
        profiler.dump_stats(profile)
    print(f"cpu seconds per step: {statistics.median(seconds):.6f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", help="a directory for each run's cProfile (CPU time)")
    parser.add_argument("--one", choices=("plain", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.steps, args.profile_file)
        return

    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    runs: dict[str, list[float]] = {"plain": [], "trainer": []}
    for repeat in range(args.repeats):
        for which in ("plain", "trainer"):
            command = [sys.executable, "-m", "benchmarks.trainer_cpu", "--one", which, "--steps", str(args.steps)]
            if args.profile:
                command += ["--profile-file", str(Path(args.profile) / f"{which}-{repeat + 1}.prof")]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[which].append(float(RESULT.search(out).group(1)))
        ratio = runs["plain"][-1] / runs["trainer"][-1]
        print(f"repeat {repeat + 1}/{args.repeats}: plain {runs['plain'][-1]:.3f} CPU s/step, trainer "
              f"{runs['trainer'][-1]:.3f}, {ratio:.2f}x", flush=True)
    ratios = [p / t for p, t in zip(runs["plain"], runs["trainer"], strict=True)]
    print(f"Trainer overhead in CPU time at (1,1,1), one torch thread, median of {args.repeats} interleaved repeats "
          f"(min-max); load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    for which in ("plain", "trainer"):
        values = runs[which]
        print(f"| {which} | {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}) CPU s/step |")
    ratio = statistics.median(ratios)
    print(f"plain / trainer CPU time per step: {ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}); "
          f"goal >= 0.85x: {'met' if ratio >= 0.85 else 'NOT met'}")


if __name__ == "__main__":
    main()
