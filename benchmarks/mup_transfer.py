"""µP transfer evidence (issue 14, item 6): does the best learning rate stay put as the model widens?

    python -m benchmarks.mup_transfer [--steps 200] [--batch 8] [--seq 32] [--seeds 1] [--plots docs]

In this one process on CPU (one rank, tp = 1: the trainer's own layers from trainers.model, its optimizer
groups from trainers.optim and its schedule), on the built-in corpus:

1. Trains the GPT at widths 64, 128 and 256 with learning rates 2^-11 … 2^-5, under the standard
   parametrization and under µP (base width 64), and takes each run's validation loss after its last step.
   Prints each width's best learning rate (the grid point, and a parabola through its neighbours in log2(lr)
   for a finer estimate) and how far it moves from width 64 to 256; writes a PNG of loss against learning rate
   per width for each parametrization (mup-transfer-standard.png, mup-transfer-mup.png).
2. The cost of the sweep that picks a target's learning rate: proxy FLOPs ÷ target FLOPs
   (contract.sweep.model_flops, 6 · parameters · tokens) for the 7 trials at width 64 or 128 against one target
   run at width 256 that trains --target-multiple times as many steps as a trial (an assumption: a sweep's
   trials are short runs, the target a long one), and the same ratio in measured wall time (the trials' own
   times against the width-256 runs' time per step).
3. σ_max spread: µP at widths 64, 128 and 256 with the width-64 optimum and a larger weight decay
   (--sigma-weight-decay), under weight-decay exponents e = 1, 0.5 and 0; for each matrix-like weight the
   ratio of its largest to its smallest top singular value across widths, and the slope of log σ_max against
   log width.

The baseline of every figure is measured in the same run: the width-64 runs (the optimum's move, σ_max's
spread) and the standard parametrization (the optimum's move under µP)."""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass, field

import torch

from contract.spec import ModelSpec, TrainingSpec, parse_spec
from contract.sweep import model_flops

WIDTHS = (64, 128, 256)
LEARNING_RATES = tuple(2.0 ** k for k in range(-11, -4))  # 2^-11 … 2^-5
BASE_WIDTH = 64
EXPONENTS = (1.0, 0.5, 0.0)
LAYERS, HEADS = 2, 4
WEIGHT_DECAY = 0.1
EVAL_WINDOWS = 64
SEED = 1234


@dataclass
class Run:
    parametrization: str  # "standard" or "mup"
    width: int
    learning_rate: float
    seed: int
    weight_decay: float
    weight_decay_exponent: float
    val_loss: float = math.inf  # +inf when training diverged (a loss that is not finite)
    seconds: float = 0.0
    sigma_max: dict[str, float] = field(default_factory=dict)  # matrix-like weights only


def model_spec(width: int, seq: int, mup: bool, exponent: float = 1.0) -> ModelSpec:
    section = {"base_hidden_size": BASE_WIDTH, "weight_decay_exponent": exponent} if mup else None
    return ModelSpec(layers=LAYERS, hidden_size=width, heads=HEADS, seq_length=seq, mup=section)


def training_spec(args, learning_rate: float, weight_decay: float, seed: int) -> TrainingSpec:
    return TrainingSpec(steps=args.steps, global_batch_size=args.batch, micro_batch_size=args.batch,
                        learning_rate=learning_rate, lr_schedule="cosine", warmup_steps=args.steps // 10,
                        weight_decay=weight_decay, seed=seed)


def train(run: Run, data, args) -> Run:
    """One training run of `run`'s configuration; fills its validation loss, time and σ_max."""
    from trainers.model import (MATRIX, Block, Embedding, GPTConfig, Head, global_named_parameters, loss_fn,
                                parameter_table)
    from trainers.mup import top_singular_values
    from trainers.optim import build_optimizer, set_lr
    from trainers.schedule import lr_at

    config = GPTConfig.from_spec(model_spec(run.width, args.seq, run.parametrization == "mup",
                                            run.weight_decay_exponent))
    training = training_spec(args, run.learning_rate, run.weight_decay, run.seed)
    layers = [Embedding(config, 1, 0, run.seed)]
    layers += [Block(config, 1, 0, run.seed, i) for i in range(config.layers)]
    layers.append(Head(config, 1, 0, run.seed))
    model = torch.nn.Sequential(*layers)
    table = parameter_table(config)
    optimizer = build_optimizer(global_named_parameters(model), table, training).optimizer
    started = time.perf_counter()
    diverged = False
    for step in range(1, args.steps + 1):
        batch = data.train_batch(step, args.batch)
        set_lr(optimizer, lr_at(step, training))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch.inputs), batch.targets)
        if not math.isfinite(loss.item()):
            diverged = True
            break
        loss.backward()
        optimizer.step()
    if not diverged:
        with torch.no_grad():
            val = data.val_batch(windows=EVAL_WINDOWS)
            value = loss_fn(model(val.inputs), val.targets).item()
        run.val_loss = value if math.isfinite(value) else math.inf
        matrices = [(name, param) for name, param in global_named_parameters(model) if table[name].role == MATRIX]
        run.sigma_max = top_singular_values(matrices, table)
    run.seconds = time.perf_counter() - started
    return run


# -- what the runs say ---------------------------------------------------------------------------------------

def mean_loss(runs: list[Run], parametrization: str, width: int, learning_rate: float) -> float:
    """The seeds' mean validation loss of one grid point (+inf if any seed diverged)."""
    losses = [r.val_loss for r in runs if (r.parametrization, r.width, r.learning_rate) ==
              (parametrization, width, learning_rate)]
    return math.inf if any(not math.isfinite(v) for v in losses) else statistics.fmean(losses)


def optimum(losses: list[float]) -> tuple[int, float]:
    """(grid index of the lowest loss, refined log2(lr)): the vertex of the parabola through the best point and
    its two neighbours in log2(lr), kept within half a grid step of it; the grid point itself at an edge."""
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    log2_lr = math.log2(LEARNING_RATES[best])
    if 0 < best < len(losses) - 1 and all(math.isfinite(losses[i]) for i in (best - 1, best + 1)):
        left, middle, right = losses[best - 1], losses[best], losses[best + 1]
        curvature = left - 2 * middle + right
        if curvature > 0:
            log2_lr += max(-0.5, min(0.5, 0.5 * (left - right) / curvature))
    return best, log2_lr


def spread(runs: list[Run]) -> tuple[float, float, float]:
    """Over the matrix-like weights: (geometric mean and largest ratio of the largest to the smallest σ_max
    across the runs' widths, mean slope of log σ_max against log width)."""
    names = sorted(runs[0].sigma_max)
    xs = [math.log(r.width) for r in runs]
    ratios, slopes = [], []
    for name in names:
        values = [r.sigma_max[name] for r in runs]
        ratios.append(max(values) / min(values))
        ys = [math.log(v) for v in values]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slopes.append(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) /
                      sum((x - mean_x) ** 2 for x in xs))
    return math.exp(statistics.fmean(math.log(r) for r in ratios)), max(ratios), statistics.fmean(slopes)


def plot(runs: list[Run], parametrization: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    finite = [r.val_loss for r in runs if r.parametrization == parametrization and math.isfinite(r.val_loss)]
    for width in WIDTHS:
        losses = [mean_loss(runs, parametrization, width, lr) for lr in LEARNING_RATES]
        shown = [(lr, v) for lr, v in zip(LEARNING_RATES, losses) if math.isfinite(v)]
        line, = axis.plot([lr for lr, _ in shown], [v for _, v in shown], marker="o", label=f"width {width}")
        best, _ = optimum(losses)
        axis.plot([LEARNING_RATES[best]], [losses[best]], marker="*", markersize=16, color=line.get_color())
    axis.set_xscale("log", base=2)
    axis.set_xlabel("learning rate")
    axis.set_ylabel("validation loss after the last step")
    if finite:  # diverged runs are left out; very poor ones would squash the interesting part
        axis.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5) + 0.05)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- the benchmark -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="windows per step (default %(default)s)")
    parser.add_argument("--seq", type=int, default=32, help="sequence length (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default %(default)s: on busy cores more threads only wait on each other)")
    parser.add_argument("--target-multiple", type=int, default=20,
                        help="the target trains this many times a trial's steps (default %(default)s)")
    parser.add_argument("--sigma-weight-decay", type=float, default=1.0,
                        help="weight decay of the σ_max runs (default %(default)s)")
    parser.add_argument("--plots", default="docs", help="directory for the PNGs (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trainers import parallel
    from trainers.data import TextData, load_corpus

    started = time.perf_counter()
    parallel.setup(parallel.ParallelDims(tp=1, pp=1, dp=1, rank=0), "127.0.0.1", free_port(), 0)  # megatron's layers need a group
    try:
        data = TextData(load_corpus(None), args.seq, SEED)
        print(f"µP transfer: {platform.machine()}, {os.cpu_count()} cores (torch threads {args.threads}), "
              f"layers {LAYERS}, heads {HEADS}, seq {args.seq}, batch {args.batch}, {args.steps} steps per run "
              f"(cosine, {args.steps // 10} warmup), weight decay {WEIGHT_DECAY}, {args.seeds} seed(s), "
              f"validation loss over {EVAL_WINDOWS} held-out windows", flush=True)
        runs = []
        for parametrization in ("standard", "mup"):
            for width in WIDTHS:
                for lr in LEARNING_RATES:
                    for seed in range(SEED, SEED + args.seeds):
                        run = train(Run(parametrization, width, lr, seed, WEIGHT_DECAY, 1.0), data, args)
                        runs.append(run)
                        print(f"  {parametrization:8} width {width:3} lr 2^{math.log2(lr):.0f} seed {seed}: "
                              f"val loss {run.val_loss:.4f} ({run.seconds:.1f} s)", flush=True)
        report_transfer(runs, args)
        report_cost(runs, args)
        report_sigma(runs, data, args)
    finally:
        parallel.teardown()
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


def report_transfer(runs: list[Run], args) -> None:
    print("\nValidation loss after the last step (seeds' mean; inf: diverged)")
    print("| parametrization | width | " + " | ".join(f"2^{math.log2(lr):.0f}" for lr in LEARNING_RATES) + " |")
    print("|---|---:|" + "---:|" * len(LEARNING_RATES))
    for parametrization in ("standard", "mup"):
        for width in WIDTHS:
            losses = [mean_loss(runs, parametrization, width, lr) for lr in LEARNING_RATES]
            best, _ = optimum(losses)
            cells = [f"**{v:.4f}**" if i == best else f"{v:.4f}" for i, v in enumerate(losses)]
            print(f"| {parametrization} | {width} | " + " | ".join(cells) + " |")

    print("\nOptimum per width (grid point; refined: parabola through its neighbours in log2 lr)")
    print("| parametrization | " + " | ".join(f"width {w}" for w in WIDTHS) +
          " | move 64→256 (grid steps) | move 64→256 (refined, octaves) |")
    print("|---|" + "---|" * len(WIDTHS) + "---:|---:|")
    for parametrization in ("standard", "mup"):
        found = [optimum([mean_loss(runs, parametrization, w, lr) for lr in LEARNING_RATES]) for w in WIDTHS]
        cells = [f"2^{math.log2(LEARNING_RATES[i]):.0f} (2^{refined:.2f})" for i, refined in found]
        print(f"| {parametrization} | " + " | ".join(cells) +
              f" | {found[-1][0] - found[0][0]:+d} | {found[-1][1] - found[0][1]:+.2f} |")
    print("Plots: " + ", ".join(f"{args.plots}/mup-transfer-{p}.png" for p in ("standard", "mup")))
    plot(runs, "standard", f"{args.plots}/mup-transfer-standard.png",
         f"standard parametrization, {args.steps} steps")
    plot(runs, "mup", f"{args.plots}/mup-transfer-mup.png", f"µP (base width {BASE_WIDTH}), {args.steps} steps")


def report_cost(runs: list[Run], args) -> None:
    target_width = WIDTHS[-1]
    target_steps = args.target_multiple * args.steps

    def flops(width: int, steps: int) -> float:
        spec = parse_spec({"name": "cost", "model": model_spec(width, args.seq, True).model_dump(),
                           "training": {"steps": steps, "global_batch_size": args.batch,
                                        "micro_batch_size": args.batch}})
        return model_flops(spec, steps)

    target_seconds_per_step = statistics.fmean(r.seconds / args.steps for r in runs
                                               if r.parametrization == "mup" and r.width == target_width
                                               and math.isfinite(r.val_loss))
    target_seconds = target_seconds_per_step * target_steps
    print(f"\nSweep cost: {len(LEARNING_RATES)} trials of {args.steps} steps at the proxy width against one target "
          f"run of {target_steps} steps ({args.target_multiple}× a trial) at width {target_width}; target wall time "
          f"{target_seconds:.0f} s (measured {target_seconds_per_step:.3f} s/step at width {target_width})")
    print("| proxy width | proxy FLOPs ÷ target FLOPs | trials' wall time | ÷ target wall time | "
          "target steps for ≤ 5 % of its FLOPs |")
    print("|---:|---:|---:|---:|---:|")
    for proxy_width in WIDTHS[:-1]:
        trials = len(LEARNING_RATES) * args.seeds
        ratio = trials * flops(proxy_width, args.steps) / flops(target_width, target_steps)
        wall = sum(r.seconds for r in runs if r.parametrization == "mup" and r.width == proxy_width)
        needed = math.ceil(trials * flops(proxy_width, args.steps) / (0.05 * flops(target_width, 1)))
        print(f"| {proxy_width} | {100 * ratio:.1f} % | {wall:.0f} s | {100 * wall / target_seconds:.1f} % | "
              f"{needed} ({needed / args.steps:.0f}× a trial) |")


def report_sigma(runs: list[Run], data, args) -> None:
    base_losses = [mean_loss(runs, "mup", BASE_WIDTH, lr) for lr in LEARNING_RATES]
    lr = LEARNING_RATES[optimum(base_losses)[0]]
    print(f"\nσ_max of the matrix-like weights across widths {list(WIDTHS)} under µP, learning rate "
          f"2^{math.log2(lr):.0f} (the width-{BASE_WIDTH} optimum), weight decay {args.sigma_weight_decay} "
          f"(× m^e on matrices), one seed; ratio = largest ÷ smallest σ_max across widths, per matrix")
    print("| e | " + " | ".join(f"σ_max at {w} (geometric mean)" for w in WIDTHS) +
          " | ratio, geometric mean over matrices | ratio, worst matrix | mean slope of log σ_max vs log width |")
    print("|---:|" + "---:|" * len(WIDTHS) + "---:|---:|---:|")
    # At the base width the exponent changes nothing (m = 1): one run serves every e.
    base = train(Run("mup", BASE_WIDTH, lr, SEED, args.sigma_weight_decay, 1.0), data, args)
    for exponent in EXPONENTS:
        wider = [train(Run("mup", width, lr, SEED, args.sigma_weight_decay, exponent), data, args)
                 for width in WIDTHS[1:]]
        if any(not r.sigma_max for r in [base, *wider]):
            print(f"| {exponent} | diverged | | |")
            continue
        mean_ratio, worst, slope = spread([base, *wider])
        means = [math.exp(statistics.fmean(math.log(v) for v in r.sigma_max.values())) for r in [base, *wider]]
        print(f"| {exponent} | " + " | ".join(f"{m:.3f}" for m in means) +
              f" | {mean_ratio:.3f} | {worst:.3f} | {slope:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
