"""Interleaved optimizer-state offload on one GPU (issue 15's benchmark): the 1B GPT of benchmarks/mfu.py in bf16
in a one-rank DeepSpeed ZeRO-1 engine,

  (a) no offload (the optimizer state on the GPU, torch's fused AdamW),
  (b) DeepSpeed's ZeRO-1 CPU offload with torch's fused CPU AdamW (the baseline to beat),
  (c) interleaved offload: offload.HybridAdam on the GPU, placement chosen by the performance model from a
      calibration of this machine at start-up,

and the update phase alone (HybridAdam on host tensors the size of the model's ZeRO-1 partitions) at device
fractions 0, 1/4, 1/2, 3/4, 1, the Deep Optimizer States code's stride of 2, and the model's own choice.

Printed (markdown, for docs/benchmarks.md): the machine; the calibration figures; per run tokens/s (median of
the measured steps), MFU (FLOPs per token as benchmarks/mfu.py counts them), update time (the engine.step()
that runs the optimizer), predicted update time and its error, peak GPU memory, pinned host memory, bytes
copied per step (estimated from what moves), the largest loss difference from (a); per update-phase placement the measured time (median of
3, with min and max) against the prediction; and the three goals: (c)'s step time <= 0.6x (b)'s, (c)'s peak
GPU memory <= (b)'s + the ring + 5 %, the chosen fraction within one grid point (1/4) of the measured best.

Each run is its own process (clean memory figures); about 6-8 minutes on an H100/H200 with 16 host cores.

    python -m benchmarks.offload [--layers 20 --hidden 2048 --heads 16 --seq 2048 --micro-batch 8
                                  --global-batch 32] [--steps 4] [--warmup 2] [--peak-tflops 989.4]
    python -m benchmarks.offload --smoke      # a tiny model; without CUDA on the simulated device
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import offload_engines as h
import torch

from offload.device import CudaDevice, SimulatedDevice
from offload.hybrid_adam import HybridAdam
from offload.perf_model import (MachineProfile, bf16_refresh_seconds, choose_placement, cpu_offload_seconds,
                                interleaved_seconds, no_offload_seconds, slots_that_fit)
from offload.subgroups import Placement

GRID = {"0": 0.0, "1/4": 0.25, "1/2": 0.5, "3/4": 0.75, "1": 1.0}
RING_SHARE_OF_FREE = 0.5


def cuda() -> bool:
    return torch.cuda.is_available()


def make_device():
    return CudaDevice() if cuda() else SimulatedDevice(memory_bytes=4 << 30, h2d_bytes_per_s=4e9,
                                                       d2h_bytes_per_s=4e9)


def calibrate(device, numel: int) -> MachineProfile:
    from offload.calibrate import measure
    return measure(device, numel=numel)


def group_numels(args) -> list[int]:
    """The two ZeRO-1 partitions (decay, no decay) of the model at dp=1, from a model on the meta device."""
    from benchmarks import plain_gpt
    from trainers.model import GPTConfig
    with torch.device("meta"):
        model = plain_gpt.GPT(GPTConfig(layers=args.layers, hidden_size=args.hidden, heads=args.heads,
                                        seq_length=args.seq, vocab_size=256))
    return [sum(p.numel() for p in group["params"]) for group in h.param_groups(model)]


def pinned_host_bytes(engine) -> int:
    """Pinned host tensors held by DeepSpeed's ZeRO optimizer and the inner optimizer's state."""
    seen: dict[int, int] = {}

    def visit(t):
        if isinstance(t, torch.Tensor):
            if t.device.type == "cpu" and t.is_pinned():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            if t.grad is not None:
                visit(t.grad)
        elif isinstance(t, (list, tuple)):
            for x in t:
                visit(x)
        elif isinstance(t, dict):
            for x in t.values():
                visit(x)
    zero = engine.optimizer
    visit(list(vars(zero).values()))
    for state in zero.optimizer.state.values():
        visit(state)
    return sum(seen.values())


# --- child: one training run -----------------------------------------------------------------------------------
def child_train(mode: str, args) -> dict:
    h.init_single_rank()
    device = planner = None
    result: dict = {"mode": mode}
    if mode == "interleaved":
        device = make_device()
        profile = calibrate(device, args.calibrate_numel)
        result["profile"] = json.loads(profile.to_json())

        def planner(table):
            free = int(device.free_memory() * RING_SHARE_OF_FREE)
            decision = choose_placement(table, profile, free_bytes=free)
            result["placement"] = {"on_device": len(decision.placement.on_device), "subgroups": len(table),
                                   "slots": decision.placement.slots, "fraction": decision.device_fraction,
                                   "ring_bytes": decision.ring_bytes,
                                   "predicted_update_s": decision.interleaved_s,
                                   "device_elements": sum(s.numel for s in table
                                                          if s.index in decision.placement.on_device)}
            return decision.placement
    model = h.build_gpt(args.layers, args.hidden, args.heads, args.seq)
    numel = sum(p.numel() for p in model.parameters())
    from benchmarks import mfu
    result["params"] = numel
    result["flops_per_token"] = mfu.flops_per_token(mfu.matmul_parameters(model), args.layers, args.hidden, args.seq)
    engine = h.build_engine(mode, model, micro_batch=args.micro_batch, global_batch=args.global_batch,
                            bf16=cuda(), device=device, subgroup_size=args.subgroup_size, planner=planner)
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    tokens = h.corpus(args.seq, (args.warmup + args.steps) * args.global_batch)
    losses, step_s, update_s = h.train(engine, tokens, args.warmup + args.steps, args.micro_batch,
                                       args.global_batch)
    measured_steps = step_s[args.warmup:]
    result.update(
        losses=losses, step_s=statistics.median(measured_steps),
        tokens_per_s=args.global_batch * args.seq / statistics.median(measured_steps),
        update_s=statistics.median(update_s[args.warmup:]), update_s_all=update_s[args.warmup:],
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda() else None,
        pinned_host_bytes=pinned_host_bytes(engine) if mode != "none" else 0)
    if device is not None and hasattr(device, "close"):
        device.close()
    return result


# --- child: the update phase alone -----------------------------------------------------------------------------
def child_update(args) -> dict:
    device = make_device()
    profile = calibrate(device, args.calibrate_numel)
    numels = group_numels(args)
    params = []
    for n in numels:
        p = device.pin(torch.full((n,), 0.01))
        p.grad = device.pin(torch.full((n,), 1e-3))
        params.append(p)
    opt = HybridAdam([{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}],
                     lr=1e-4, betas=h.BETAS, eps=h.EPS, device=device, subgroup_size=args.subgroup_size)
    table = opt.table
    free = int(device.free_memory() * RING_SHARE_OF_FREE)
    decision = choose_placement(table, profile, free_bytes=free)
    slots = max(slots_that_fit(table, free), 1)  # the grid runs with the ring the memory allows
    placements = {name: Placement.fraction(table, f, slots) for name, f in GRID.items()}
    placements["stride 2"] = Placement.stride(table, 2, slots)
    placements["model's choice"] = decision.placement
    rows = {}
    for name, placement in placements.items():
        opt.set_placement(placement)
        times = []
        for i in range(1 + args.update_repeats):
            started = time.perf_counter()
            full = opt.param_groups
            for group in full:  # as DeepSpeed: one step() per group, param_groups narrowed to it
                opt.param_groups = [group]
                opt.step()
            opt.param_groups = full
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - started)
        refresh = bf16_refresh_seconds(sum(numels), 2, profile)
        rows[name] = {"fraction": sum(s.numel for s in table if s.index in placement.on_device) / sum(numels),
                      "slots": placement.slots, "measured_s": times,
                      "predicted_s": interleaved_seconds(table, placement, profile) - refresh}
    opt.release_device_memory()
    if hasattr(device, "close"):
        device.close()
    return {"profile": json.loads(profile.to_json()), "numels": numels, "subgroups": len(table),
            "chosen_fraction": decision.device_fraction, "rows": rows}


# --- parent: run the children, print the report ----------------------------------------------------------------
def run_child(kind: str, args, out_dir: Path) -> dict:
    out = out_dir / f"{kind}.json"
    argv = [sys.executable, "-m", "benchmarks.offload", "--child", kind, "--out", str(out)] + args.forward
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.child_timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        raise SystemExit(f"{kind}: exit code {proc.returncode}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    print(f"# {kind}: done in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def report(args, runs: dict, update: dict) -> None:
    from benchmarks import mfu
    a, b, c = runs["none"], runs["cpu"], runs["interleaved"]
    p = MachineProfile(**c["profile"])
    n = a["params"]
    print(f"machine: {mfu.machine()}; {os.cpu_count()} host cores, {torch.get_num_threads()} torch threads")
    print(f"model: plain_gpt layers={args.layers} hidden={args.hidden} heads={args.heads} seq={args.seq}, "
          f"{n:,} parameters, {'bf16' if cuda() else 'fp32'}; global batch {args.global_batch} x {args.seq} "
          f"tokens in micro-batches of {args.micro_batch}; {args.warmup} warm-up + {args.steps} measured steps")
    print("\ncalibration (offload.calibrate, at start-up of (c)):\n")
    print(f"- pinned copies: {p.h2d_bytes_per_s / 1e9:.1f} GB/s in, {p.d2h_bytes_per_s / 1e9:.1f} GB/s out alone; "
          f"{p.h2d_concurrent_bytes_per_s / 1e9:.1f} GB/s each way together")
    print(f"- CPU fused AdamW: {p.cpu_adam_params_per_s / 1e9:.2f} G params/s alone, "
          f"{p.cpu_adam_during_copies_params_per_s / 1e9:.2f} while copying; GPU fused AdamW "
          f"{p.device_adam_params_per_s / 1e9:.1f} G params/s; free GPU memory {gib(p.device_free_bytes)}")
    pl = c["placement"]
    print(f"- placement: {pl['on_device']} of {pl['subgroups']} subgroups on the GPU ({pl['fraction']:.0%} of "
          f"elements), K={pl['slots']}, ring {gib(pl['ring_bytes'])}")

    predicted = {"none": no_offload_seconds(n, p), "cpu": cpu_offload_seconds(n, p),
                 "interleaved": pl["predicted_update_s"]}
    # Estimated from what moves, not measured: bf16 gradients out and bf16 weights back (DeepSpeed's offload),
    # plus 16 bytes in and 12 out per device-subgroup element (interleaved).
    copied = {"none": 0, "cpu": 2 * n + 2 * n,
              "interleaved": 2 * n + 2 * n + 28 * pl["device_elements"]}
    flops_per_token = a["flops_per_token"]
    print("\n| run | tokens/s | MFU | step s | update s (measured) | update s (predicted) | error | peak GPU memory "
          "| pinned host memory | host<->GPU bytes per step (est.) | max loss diff vs (a) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"none": "(a) no offload", "cpu": "(b) DeepSpeed CPU offload, fused CPU AdamW",
             "interleaved": "(c) interleaved, automatic placement"}
    for mode, r in runs.items():
        mfu_value = r["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
        diff = max(abs(x - y) for x, y in zip(r["losses"], a["losses"]))
        err = (predicted[mode] - r["update_s"]) / r["update_s"]
        print(f"| {names[mode]} | {r['tokens_per_s']:.0f} | {mfu_value:.1%} | {r['step_s']:.2f} | "
              f"{r['update_s']:.3f} | {predicted[mode]:.3f} | {err:+.0%} | {gib(r['peak_gpu_bytes'])} | "
              f"{gib(r['pinned_host_bytes'])} | {gib(copied[mode])} | {diff:.2e} |")
    print("\nupdate phase alone (HybridAdam on host tensors of the partitions' size; median of "
          f"{args.update_repeats} after a warm-up, without DeepSpeed's bf16 refresh):\n")
    print("| placement | device fraction | K | measured s, median (min-max) | predicted s | error |")
    print("|---|---:|---:|---:|---:|---:|")
    best_name, best_time = None, None
    for name, row in update["rows"].items():
        m = statistics.median(row["measured_s"])
        if name in GRID and (best_time is None or m < best_time):
            best_name, best_time = name, m
        print(f"| {name} | {row['fraction']:.2f} | {row['slots']} | {m:.3f} ({min(row['measured_s']):.3f}-"
              f"{max(row['measured_s']):.3f}) | {row['predicted_s']:.3f} | {(row['predicted_s'] - m) / m:+.0%} |")

    ratio = c["step_s"] / b["step_s"]
    limit = b["peak_gpu_bytes"] + pl["ring_bytes"] + 0.05 * b["peak_gpu_bytes"] if cuda() else None
    chosen = update["chosen_fraction"]
    print("\ngoals:")
    print(f"- (c) step time / (b) step time = {ratio:.2f} (goal <= 0.60): {'met' if ratio <= 0.6 else 'NOT met'}")
    if cuda():
        ok = c["peak_gpu_bytes"] <= limit
        print(f"- (c) peak GPU memory {gib(c['peak_gpu_bytes'])} <= (b)'s + ring + 5 % = {gib(limit)}: "
              f"{'met' if ok else 'NOT met'}")
    ok = abs(chosen - GRID[best_name]) <= 0.25 + 1e-9
    print(f"- chosen fraction {chosen:.2f} vs measured best grid point {best_name} ({GRID[best_name]:.2f}): "
          f"{'met' if ok else 'NOT met'} (within one grid point)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--subgroup-size", type=int, default=10_000_000)
    parser.add_argument("--calibrate-numel", type=int, default=1 << 26)
    parser.add_argument("--update-repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=mfu_peak())
    parser.add_argument("--child-timeout", type=int, default=400)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, seconds (CPU: simulated device)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.heads, args.seq = 2, 128, 4, 64
        args.micro_batch, args.global_batch, args.steps, args.warmup = 2, 4, 2, 1
        args.subgroup_size, args.calibrate_numel, args.update_repeats = 50_000, 1 << 18, 2
    if args.child:
        result = child_update(args) if args.child == "update" else child_train(args.child, args)
        Path(args.out).write_text(json.dumps(result))
        return
    args.forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("smoke", "child", "out", "child_timeout") and v is not None]
    with tempfile.TemporaryDirectory() as tmp:
        update = run_child("update", args, Path(tmp))
        runs = {mode: run_child(mode, args, Path(tmp)) for mode in ("none", "cpu", "interleaved")}
    report(args, runs, update)


def mfu_peak() -> float:
    from benchmarks import mfu
    return mfu.H100_SXM_BF16_DENSE_TFLOPS


if __name__ == "__main__":
    main()
