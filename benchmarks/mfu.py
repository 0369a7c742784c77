"""Model FLOPs utilisation (MFU) of the trainer on one GPU, against plain PyTorch in the same run.

Two runs of the same GPT (default: 20 layers, hidden 2048, 16 heads, sequence 2048, byte vocabulary 256,
about 1.01 B parameters), the same global batch (default 32 sequences = 65,536 tokens per step, in
micro-batches of 8), data (the built-in byte corpus) and precision (default bf16):

1. plain PyTorch: benchmarks/plain_gpt.py's single-process GPT on the GPU, fp32 weights under
   `torch.autocast(bfloat16)`, torch AdamW, gradient accumulation over the micro-batches;
2. the roundhouse trainer, `python -m trainers` at layout (1, 1, 1) as a plain process (NCCL, no control
   plane; benchmarks/trainer.py's `run_trainer`): megatron-core layers in a DeepSpeed pipeline engine with
   ZeRO-1, `training.precision: bf16` (DeepSpeed's bf16 mode: bf16 weights, fp32 master weights).

Tokens/s is the median over the measured steps (each step ends with the loss read back, so it waits for
the GPU); the first 3 steps are warm-up and left out. Model FLOPs per token:

    6 * N + 12 * layers * hidden * seq

N counts the parameters that take part in matrix products (the blocks and the output head; the token and
position embeddings are lookups and left out); the second term is attention's two matrix products
(QK^T and AV, forward and backward), counted for the full T x T score matrix as in PaLM's MFU, not halved
for the causal mask. Achieved TFLOP/s = tokens/s * FLOPs per token; MFU = that / the peak (default 989.4
TFLOP/s, H100 SXM dense bf16). A bf16 matrix product of 8192^3 on random data is timed too, as the
practical ceiling. Peak GPU memory is torch.cuda.max_memory_allocated of each run's process.

    python -m benchmarks.mfu [--layers 20 --hidden 2048 --heads 16 --seq 2048 --micro-batch 8 --global-batch 32]
                             [--steps 13] [--precision bf16] [--log-dir DIR] [--skip-plain] [--skip-trainer]
                             [--profile]

With --profile, one more plain PyTorch step runs under torch.profiler and its GPU kernel time is printed by
kind (matrix products, attention, optimizer, LayerNorm, GELU, the rest): where the time goes.

About 3 minutes on an H100. A smoke run (also on a CPU, with --precision fp32):
`--layers 2 --hidden 128 --heads 4 --seq 128 --micro-batch 2 --global-batch 4 --steps 5`.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import plain_gpt
from benchmarks.trainer import WARMUP_STEPS, run_trainer

from contract.spec import parse_spec
from trainers.data import TextData
from trainers.optim import set_lr
from trainers.schedule import lr_at

H100_SXM_BF16_DENSE_TFLOPS = 989.4
PEAK_MEMORY_LINE = re.compile(r"^roundhouse trainer: peak GPU memory (\d+) bytes", re.M)


def build_spec(args):
    return parse_spec({
        "name": "mfu",
        "model": {"layers": args.layers, "hidden_size": args.hidden, "heads": args.heads,
                  "seq_length": args.seq, "vocab_size": 256},
        "training": {"steps": args.steps, "global_batch_size": args.global_batch,
                     "micro_batch_size": args.micro_batch, "learning_rate": 1e-4, "warmup_steps": WARMUP_STEPS,
                     "seed": 5, "precision": args.precision}})


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix products: all but the token and position embeddings."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("tok_emb", "pos_emb")))


def flops_per_token(n_matmul: int, layers: int, hidden: int, seq: int) -> int:
    return 6 * n_matmul + 12 * layers * hidden * seq


def run_plain(spec, device: torch.device) -> tuple[float, int | None, list[float]]:
    """The plain PyTorch loop on `device`; median tokens/s, peak GPU memory (bytes), and every step's loss."""
    t, bf16 = spec.training, spec.training.precision == "bf16"
    model = plain_gpt.build_model(spec.model, t.seed).to(device)
    optimizer = plain_gpt.build_optimizer(model, t)
    data = TextData.from_path(None, spec.model.seq_length, t.seed)
    micro = t.global_batch_size // t.micro_batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates, losses = [], []
    for step in range(1, t.steps + 1):
        started = time.perf_counter()
        set_lr(optimizer, lr_at(step, t))
        batch = data.train_batch(step, t.global_batch_size)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for inputs, targets in zip(batch.inputs.split(t.micro_batch_size), batch.targets.split(t.micro_batch_size),
                                   strict=True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(inputs.to(device), targets.to(device)) / micro
            loss.backward()
            total += loss.detach()
        optimizer.step()
        losses.append(total.item())  # waits for the step's GPU work
        if step > WARMUP_STEPS:
            rates.append(t.global_batch_size * spec.model.seq_length / (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(rates), peak, losses


KERNEL_CATEGORIES = (  # (category, substrings of a kernel's name), first match wins
    ("matrix products (cuBLAS)", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("attention (SDPA)", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("optimizer (AdamW, multi-tensor)", ("multi_tensor", "adam")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("GELU", ("gelu",)),
)


def profile_plain(spec, device: torch.device, matmul_flops_per_token: int) -> None:
    """One plain PyTorch step under torch.profiler, after two unprofiled ones: GPU time by kind of kernel."""
    from torch.profiler import ProfilerActivity, profile

    t, bf16 = spec.training, spec.training.precision == "bf16"
    model = plain_gpt.build_model(spec.model, t.seed).to(device)
    optimizer = plain_gpt.build_optimizer(model, t)
    data = TextData.from_path(None, spec.model.seq_length, t.seed)
    micro = t.global_batch_size // t.micro_batch_size

    def step(number: int) -> None:
        batch = data.train_batch(number, t.global_batch_size)
        optimizer.zero_grad(set_to_none=True)
        for inputs, targets in zip(batch.inputs.split(t.micro_batch_size), batch.targets.split(t.micro_batch_size),
                                   strict=True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(inputs.to(device), targets.to(device)) / micro
            loss.backward()
        optimizer.step()
        torch.cuda.synchronize()

    step(1)
    step(2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        step(3)
        wall = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_category: dict[str, float] = {}
    for event in kernels:
        name = event.name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)),
                        "other (casts, adds, copies, loss)")
        by_category[category] = by_category.get(category, 0.0) + event.time_range.elapsed_us() / 1e6
    busy = sum(by_category.values())
    print(f"\nprofile of one plain PyTorch step (torch.profiler; the profiler slows the host a little): "
          f"wall {wall * 1e3:.0f} ms, GPU kernels {busy * 1e3:.0f} ms ({busy / wall:.0%} of wall)\n")
    print("| kernels | GPU ms | share of kernel time |")
    print("|---|---:|---:|")
    for category, seconds in sorted(by_category.items(), key=lambda item: -item[1]):
        print(f"| {category} | {seconds * 1e3:.0f} | {seconds / busy:.0%} |")
    matmul = by_category.get(KERNEL_CATEGORIES[0][0])
    if matmul:
        tokens = t.global_batch_size * spec.model.seq_length
        print(f"\nmatrix products alone: {tokens * matmul_flops_per_token / matmul / 1e12:.0f} TFLOP/s over their "
              f"own kernel time (6 * N FLOPs per token)")
    del model, optimizer
    torch.cuda.empty_cache()


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 (size x size) @ (size x size) on random data, timed with CUDA events (median of `repeats`)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / statistics.median(times) / 1e12


def machine() -> str:
    if not torch.cuda.is_available():
        return f"CPU only, torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "?"
    return (f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), driver "
            f"{driver}, torch {torch.__version__} (CUDA {torch.version.cuda})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=13, help=f"in all, the first {WARMUP_STEPS} are warm-up")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="the GPU's dense peak for --precision (default: H100 SXM, bf16)")
    parser.add_argument("--log-dir", help="keep the trainer's spec and log here (default: a temporary directory)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one plain PyTorch step: GPU time by kind of kernel (CUDA only)")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    spec = build_spec(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        n_all = plain_gpt.GPT(plain_gpt.GPTConfig.from_spec(spec.model)).num_parameters()
        n_matmul = matmul_parameters(plain_gpt.GPT(plain_gpt.GPTConfig.from_spec(spec.model)))
    per_token = flops_per_token(n_matmul, args.layers, args.hidden, args.seq)
    print(f"MFU benchmark {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: {machine()}", flush=True)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, vocab 256: "
          f"{n_all:,} parameters ({n_matmul:,} in matrix products); global batch {args.global_batch} x {args.seq}"
          f" = {args.global_batch * args.seq:,} tokens/step in micro-batches of {args.micro_batch}; "
          f"{args.precision}; {args.steps} steps, the first {WARMUP_STEPS} warm-up", flush=True)
    print(f"model FLOPs per token: 6 * {n_matmul:,} + 12 * {args.layers} * {args.hidden} * {args.seq} = "
          f"{per_token / 1e9:.3f} GFLOP", flush=True)

    rows = []  # (name, tokens/s, peak memory bytes or None)
    ceiling = matmul_tflops() if device.type == "cuda" else None
    if not args.skip_plain:
        rate, peak, losses = run_plain(spec, device)
        print(f"plain PyTorch: {rate:,.0f} tok/s; losses {', '.join(f'{x:.3f}' for x in losses)}", flush=True)
        rows.append(("plain PyTorch GPT (autocast)" if args.precision == "bf16" else "plain PyTorch GPT", rate,
                     peak))
    if not args.skip_trainer:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(args.log_dir) if args.log_dir else Path(tmp)
            directory.mkdir(parents=True, exist_ok=True)
            try:
                rate, _ = run_trainer(spec, directory)
            except RuntimeError:
                print((directory / "rank-0.log").read_text()[-8000:], flush=True)
                raise
            log = (directory / "rank-0.log").read_text()
            found = PEAK_MEMORY_LINE.search(log)
            print(f"roundhouse trainer: {rate:,.0f} tok/s; "
                  + "; ".join(line for line in log.splitlines() if line.startswith("step ")), flush=True)
            rows.append(("roundhouse trainer (1,1,1), DeepSpeed bf16" if args.precision == "bf16"
                         else "roundhouse trainer (1,1,1)", rate, int(found.group(1)) if found else None))

    print()
    print(f"| run | tokens/s | achieved TFLOP/s | MFU (of {args.peak_tflops:g}) | vs plain PyTorch | "
          "peak GPU memory (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0][1] if rows and not args.skip_plain else None
    for name, rate, peak in rows:
        achieved = rate * per_token / 1e12
        ratio = f"{rate / base:.2f}x" if base else "-"
        memory = f"{peak / 2**30:.1f}" if peak is not None else "-"
        print(f"| {name} | {rate:,.0f} | {achieved:.0f} | {achieved / args.peak_tflops:.1%} | {ratio} | {memory} |")
    if ceiling is not None:
        print(f"| bf16 matmul 8192^3, random data (ceiling) | - | {ceiling:.0f} | "
              f"{ceiling / args.peak_tflops:.1%} | - | - |")
    if args.profile and device.type == "cuda":
        profile_plain(spec, device, 6 * n_matmul)


if __name__ == "__main__":
    main()
