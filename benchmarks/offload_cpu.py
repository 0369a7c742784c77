"""The cost of interleaved offload on a CPU: a small GPT (benchmarks/plain_gpt.py) in a one-rank DeepSpeed ZeRO-1
engine, trained with (a) no offload, (b) DeepSpeed's CPU offload with torch's fused AdamW, (c) interleaved
offload with HybridAdam on the simulated device (unthrottled, so what is measured is the machinery: subgroup
views, the ring, the stream threads, events), all in one run.

The three engines train in turn, `--steps` steps each per repeat, `--repeats` rounds (a b c a b c ...), so
machine noise falls on all three alike. Printed per mode: the median tokens/s and the median update time (the
engine.step() that runs the optimizer) over the repeats, with their spread; and the losses of the first repeat,
which must agree (all three run the same fused AdamW arithmetic on the CPU).

On a CPU every side of (c) runs on the same cores, so (c) cannot be faster here; the question is what it
costs. The speed-up needs an accelerator: benchmarks/offload.py.

    python -m benchmarks.offload_cpu [--layers 4 --hidden 512 --heads 8 --seq 64] [--repeats 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import offload_engines as h
import torch

from offload import Placement, SimulatedDevice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per mode per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--subgroup-size", type=int, default=1_000_000)
    parser.add_argument("--device-fraction", type=float, default=0.5)
    parser.add_argument("--slots", type=int, default=3)
    args = parser.parse_args()

    h.init_single_rank()
    device = SimulatedDevice(memory_bytes=1 << 30)
    engines = {}
    for mode in ("none", "cpu", "interleaved"):
        model = h.build_gpt(args.layers, args.hidden, args.heads, args.seq)
        engines[mode] = h.build_engine(
            mode, model, micro_batch=args.micro_batch, global_batch=args.global_batch, bf16=False, device=device,
            subgroup_size=args.subgroup_size,
            planner=lambda table: Placement.fraction(table, args.device_fraction, args.slots))
    params = sum(p.numel() for p in engines["none"].module.parameters())
    tokens = h.corpus(args.seq, (args.repeats * args.steps + 1) * args.global_batch)
    tokens_per_step = args.global_batch * args.seq

    warmup_row = args.repeats * args.steps * args.global_batch
    for engine in engines.values():  # first step: state allocated, ring built, threads started
        h.train(engine, tokens, 1, args.micro_batch, args.global_batch, first_row=warmup_row)
    rates = {m: [] for m in engines}
    updates = {m: [] for m in engines}
    first_losses = {}
    started = time.perf_counter()
    for r in range(args.repeats):
        for mode, engine in engines.items():
            losses, step_s, update_s = h.train(engine, tokens, args.steps, args.micro_batch, args.global_batch,
                                               first_row=r * args.steps * args.global_batch)
            rates[mode].append(tokens_per_step * len(step_s) / sum(step_s))
            updates[mode].append(statistics.median(update_s) * 1e3)
            first_losses.setdefault(mode, losses)
    wall = time.perf_counter() - started

    opt = engines["interleaved"].optimizer.optimizer
    print(f"machine: CPU only, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: plain_gpt layers={args.layers} hidden={args.hidden} heads={args.heads} seq={args.seq}, "
          f"{params:,} parameters, fp32; global batch {args.global_batch} x {args.seq} tokens, "
          f"micro-batch {args.micro_batch}")
    print(f"interleaved: {len(opt.table)} subgroups of <= {args.subgroup_size:,}, "
          f"{len(opt.placement.on_device)} on the simulated device, K={opt.placement.slots}")
    print(f"{args.repeats} interleaved repeats x {args.steps} steps per mode, {wall:.0f} s\n")
    print("| mode | tokens/s, median (min-max) | update ms, median (min-max) | tokens/s vs no offload |")
    print("|---|---:|---:|---:|")
    base = statistics.median(rates["none"])
    names = {"none": "(a) no offload", "cpu": "(b) DeepSpeed CPU offload, fused AdamW",
             "interleaved": "(c) interleaved, simulated device"}
    for mode in engines:
        r, u = rates[mode], updates[mode]
        print(f"| {names[mode]} | {statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f}) | "
              f"{statistics.median(u):.1f} ({min(u):.1f}-{max(u):.1f}) | {statistics.median(r) / base:.2f}x |")
    print("\nlosses, first repeat (after one warm-up step on other data):")
    for mode, losses in first_losses.items():
        print(f"  {mode:12s} " + " ".join(f"{x:.6f}" for x in losses))
    same = first_losses["interleaved"] == first_losses["cpu"] == first_losses["none"]
    print(f"identical across modes: {same}")
    device.close()


if __name__ == "__main__":
    main()
