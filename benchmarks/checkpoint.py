"""Checkpoint cost on this machine (issue 4), each figure against a baseline measured in the same run.

1. Save throughput: bytes of a committed checkpoint / (write + checksums) seconds, and / the whole commit
   (snapshot included), against `dd if=/dev/zero bs=1M conv=fsync` of the same size into the same directory
   (run three times, after the trainer; the fastest run is the baseline). Sync saves. Goal: >= 70 % of dd.
   One more dd, with oflag=direct, shows the device's own speed without the page cache, for context (the
   checkpointer writes with O_DIRECT).
2. Blocked training: seconds the training loop was blocked by the non-final saves (the final save always
   blocks, so it is left out), async_save true against false, same model, steps and interval. Also each
   run's whole training time ("trained steps" line) against the same run without checkpoints: on a machine
   with few cores the background write and its checksums compete with training for them. Goal: <= 10 %.
3. Reshaped load: one checkpoint written at --written (default (1,1,2)), loaded at the same layout and at
   each --reshaped layout (same number of ranks); the restore's total (checksums + load) and load alone,
   reshaped / same layout. The files are read once first, so every load finds them in the page cache: this
   compares the two code paths, not the disk. Goal: <= 1.3x.

The trainer runs as real rank processes (`python -m trainers`, gloo, CPU) with ROUNDHOUSE_CHECKPOINT_DIR set;
figures are parsed from rank 0's output. The default model (8 layers, hidden 512, vocabulary 256: 25 M
parameters) makes a checkpoint of about 300 MB (fp32 weights and two Adam moments).

    python -m benchmarks.checkpoint [--parts abc] [--layers 8] [--hidden 512] [--steps 12] [--interval 4]
                                    [--ranks 1] [--repeats 1] [--dir /tmp]
    python -m benchmarks.checkpoint --layers 2 --hidden 64 --steps 4 --interval 2   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from orchestrator.launcher.local import free_port
from contract.spec import parse_spec
from trainers.checkpoint import Manifest, committed_steps, step_dir

COMMIT = re.compile(r"^checkpoint step (\d+) committed: (\d+) bytes in ([\d.]+) s \(snapshot\+wait ([\d.]+) s, "
                    r"write ([\d.]+) s, checksums ([\d.]+) s\)", re.M)
BLOCKED = re.compile(r"^checkpoint step (\d+) blocked training ([\d.]+) s", re.M)
RESTORED = re.compile(r"checkpoint restored: step (\d+) \((.*?)\) written at tp=(\d+) pp=(\d+) dp=(\d+), loaded at "
                      r"tp=(\d+) pp=(\d+) dp=(\d+) \((same layout|reshaped)\) in ([\d.]+) s \(checksums ([\d.]+) s, "
                      r"load ([\d.]+) s\)")
TRAINED = re.compile(r"trained steps (\d+)-(\d+) in ([\d.]+) s")
STEP = re.compile(r"^step (\d+)/\d+ loss \S+ lr \S+ tok/s (\d+)", re.M)
PARAMETERS = re.compile(r", ([\d,]+) parameters,")
DD = re.compile(r"^(\d+) bytes .* copied, ([\d.e+-]+) s", re.M)


@dataclass
class Commit:
    step: int
    size: int
    total: float
    snapshot: float
    write: float
    checksums: float


@dataclass
class Run:
    """What rank 0 printed."""
    output: str
    wall: float
    commits: list[Commit] = field(default_factory=list)
    blocked: dict[int, float] = field(default_factory=dict)  # step -> seconds
    trained: float | None = None
    restored: re.Match | None = None
    step_seconds: float | None = None  # median over the steps after the first
    parameters: int | None = None

    @classmethod
    def parse(cls, output: str, wall: float, tokens_per_step: int) -> Run:
        run = cls(output, wall)
        run.commits = [Commit(int(m[1]), int(m[2]), float(m[3]), float(m[4]), float(m[5]), float(m[6]))
                       for m in COMMIT.finditer(output)]
        run.blocked = {int(m[1]): float(m[2]) for m in BLOCKED.finditer(output)}
        if m := TRAINED.search(output):
            run.trained = float(m[3])
        run.restored = RESTORED.search(output)
        rates = [int(m[2]) for m in STEP.finditer(output)][1:]
        if rates:
            run.step_seconds = statistics.median(tokens_per_step / r for r in rates if r > 0)
        if m := PARAMETERS.search(output):
            run.parameters = int(m[1].replace(",", ""))
        return run


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.runs = 0

    def spec(self, layout: tuple[int, int, int], steps: int, checkpoint: dict) -> Path:
        a = self.args
        tp, pp, dp = layout
        spec = parse_spec({
            "name": "ckpt-bench",
            "model": {"layers": a.layers, "hidden_size": a.hidden, "heads": a.heads, "seq_length": a.seq},
            "parallelism": {"tp": tp, "pp": pp, "dp": dp},
            "training": {"steps": steps, "global_batch_size": a.batch, "micro_batch_size": a.micro_batch,
                         "learning_rate": 1e-3, "warmup_steps": 0, "seed": 5},
            "checkpoint": checkpoint})
        self.runs += 1
        path = self.tmp / f"spec-{self.runs}.json"
        path.write_text(spec.model_dump_json())
        return path

    def train(self, layout: tuple[int, int, int], steps: int, checkpoint: dict, checkpoints: Path | None) -> Run:
        """Runs every rank; returns rank 0's parsed output. Raises with the log's tail if a rank fails."""
        spec_file = self.spec(layout, steps, checkpoint)
        run_dir = self.tmp / f"run-{self.runs}"
        run_dir.mkdir()
        world = layout[0] * layout[1] * layout[2]
        port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ROUNDHOUSE_", "RH_"))}
        procs = []
        started = time.perf_counter()
        for rank in range(world):
            env = {**base, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ROUNDHOUSE_SPEC_FILE": str(spec_file),
                   "PYTHONUNBUFFERED": "1"}
            if checkpoints is not None:
                env["ROUNDHOUSE_CHECKPOINT_DIR"] = str(checkpoints)
            with open(run_dir / f"rank-{rank}.log", "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "trainers"], env=env, stdout=out,
                                              stderr=subprocess.STDOUT, cwd=run_dir))
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - started
        output = (run_dir / "rank-0.log").read_text()
        for rank, code in enumerate(codes):
            if code != 0:
                tail = (run_dir / f"rank-{rank}.log").read_text()[-3000:]
                raise RuntimeError(f"rank {rank} of {layout} exited with code {code}:\n{tail}")
        return Run.parse(output, wall, self.args.batch * self.args.seq)


def dd(directory: Path, mib: int, direct: bool = False) -> tuple[int, float]:
    """Bytes and seconds of dd writing `mib` MiB of zeros sequentially, fsync'd, into `directory` (through the
    page cache, or with O_DIRECT)."""
    target = directory / "dd.bin"
    how = ["bs=4M", f"count={mib // 4}", "oflag=direct"] if direct else ["bs=1M", f"count={mib}"]
    try:
        started = time.perf_counter()
        done = subprocess.run(["dd", "if=/dev/zero", f"of={target}", *how, "conv=fsync"],
                              capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, check=True)
        elapsed = time.perf_counter() - started
    finally:
        target.unlink(missing_ok=True)
    m = DD.search(done.stderr)
    if m is None:  # an unfamiliar dd: our own clock (includes starting dd, a few ms)
        return mib << 20, elapsed
    return int(m[1]), float(m[2])


def layout_arg(text: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in text.strip("()").split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected tp,pp,dp")
    return parts  # type: ignore[return-value]


def part_a_b(bench: Bench, args, directory: Path) -> None:
    layout = (1, 1, args.ranks)
    every = {"interval": args.interval, "keep_last": args.steps // args.interval + 1}  # no deletions in the timings
    runs: dict[str, Run] = {}
    # Sync first: its commits are also figure 1's sample.
    runs["sync"] = bench.train(layout, args.steps, {**every, "async_save": False}, directory / "sync")
    shutil.rmtree(directory / "sync")
    size = max(c.size for c in runs["sync"].commits)
    mib = max(256, -(-size // (4 << 20)) * 4)  # whole 4 MiB blocks, for the O_DIRECT run
    dds = [dd(directory, mib) for _ in range(3)]
    dd_rate = max(b / s for b, s in dds)  # the fastest: the most demanding baseline
    direct_bytes, direct_seconds = dd(directory, mib, direct=True)

    commits = runs["sync"].commits
    data = sum(c.size for c in commits)
    write_rate = data / sum(c.write + c.checksums for c in commits)
    commit_rate = data / sum(c.total for c in commits)
    write_only = data / sum(c.write for c in commits)
    print(f"1. Save throughput: {len(commits)} sync checkpoints of {size / 1e6:,.0f} MB "
          f"({runs['sync'].parameters or 0:,} parameters, layout {layout}), in a temporary directory under "
          f"{directory.parent.parent}")
    print()
    print("| what | MB/s | vs dd |")
    print("|---|---:|---:|")
    for i, (b, s) in enumerate(dds, 1):
        print(f"| dd bs=1M count={mib} conv=fsync, run {i} | {b / s / 1e6:,.0f} | {b / s / dd_rate:.2f}x |")
    print(f"| dd, fastest run (baseline) | {dd_rate / 1e6:,.0f} | 1.00x |")
    print(f"| dd bs=4M oflag=direct conv=fsync (the device without the page cache; for context) | "
          f"{direct_bytes / direct_seconds / 1e6:,.0f} | {direct_bytes / direct_seconds / dd_rate:.2f}x |")
    print(f"| checkpoint: bytes / write | {write_only / 1e6:,.0f} | {write_only / dd_rate:.2f}x |")
    print(f"| checkpoint: bytes / (write + checksums) | {write_rate / 1e6:,.0f} | {write_rate / dd_rate:.2f}x |")
    print(f"| checkpoint: bytes / whole commit (snapshot + write + checksums + manifest) | {commit_rate / 1e6:,.0f} "
          f"| {commit_rate / dd_rate:.2f}x |")
    print()
    print("| commit at step | MB | snapshot+wait s | write s | checksums s | total s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in commits:
        print(f"| {c.step} | {c.size / 1e6:,.0f} | {c.snapshot:.3f} | {c.write:.3f} | {c.checksums:.3f} | "
              f"{c.total:.3f} |")
    print(flush=True)
    if "b" not in args.parts:
        return

    runs["async"] = bench.train(layout, args.steps, {**every, "async_save": True}, directory / "async")
    shutil.rmtree(directory / "async")
    runs["none"] = bench.train(layout, args.steps, {"interval": 0}, None)

    def non_final(run: Run) -> list[float]:
        return [s for step, s in sorted(run.blocked.items()) if step != args.steps]

    blocked = {k: sum(non_final(runs[k])) for k in ("sync", "async")}
    saves = len(non_final(runs["sync"]))
    step_s = runs["none"].step_seconds or 0.0
    print(f"2. Training blocked by saves: {args.steps} steps, a save every {args.interval} "
          f"({saves} non-final saves; the final save always blocks and is left out), layout {layout}; "
          f"a step takes {step_s:.2f} s without checkpoints, so saves are {args.interval * step_s:.1f} s apart")
    print()
    print("| run | blocked by non-final saves, s | vs sync | final save blocked, s | trained steps, s | "
          "vs no checkpoints |")
    print("|---|---:|---:|---:|---:|---:|")
    base = runs["none"].trained or float("nan")
    for name in ("none", "sync", "async"):
        run = runs[name]
        label = "no checkpoints" if name == "none" else f"{name} saves"
        if name in blocked:
            ratio = f"{blocked[name] / blocked['sync']:.3f}x" if blocked["sync"] else "-"
            cells = [f"{blocked[name]:.3f}", ratio, f"{run.blocked.get(args.steps, float('nan')):.3f}"]
        else:
            cells = ["-", "-", "-"]
        trained = [f"{run.trained:.2f}", f"{run.trained / base:.2f}x"] if run.trained else ["?", "?"]
        print("| " + " | ".join([label, *cells, *trained]) + " |")
    print()
    print("Per save (async): blocked s, and the background commit's own duration s:")
    by_step = {c.step: c for c in runs["async"].commits}
    for step, s in sorted(runs["async"].blocked.items()):
        c = by_step.get(step)
        print(f"  step {step}: blocked {s:.3f} s; commit took {c.total:.3f} s (write {c.write:.3f}, checksums "
              f"{c.checksums:.3f})" if c else f"  step {step}: blocked {s:.3f} s; no commit line")
    print(flush=True)


def part_c(bench: Bench, args, directory: Path) -> None:
    written, others = args.written, args.reshaped
    world = written[0] * written[1] * written[2]
    for layout in others:
        if layout[0] * layout[1] * layout[2] != world:
            raise SystemExit(f"--reshaped {layout}: {world} ranks wanted, like --written {written}")
    source = directory / "written"
    bench.train(written, 1, {"interval": 1, "keep_last": 1}, source)
    for path in source.rglob("*"):  # written with O_DIRECT: read once, so that every load finds them cached
        if path.is_file():
            path.read_bytes()
    layouts = [written, *others]
    results: dict[tuple[int, int, int], list[tuple[float, float, float]]] = {layout: [] for layout in layouts}
    for _ in range(args.repeats):
        for layout in layouts:
            run = bench.train(layout, 2, {"interval": 0}, source)  # resumes after step 1; saves nothing
            m = run.restored
            if m is None:
                raise RuntimeError(f"no 'checkpoint restored' line at {layout}:\n{run.output[-3000:]}")
            expect = "same layout" if layout == written else "reshaped"
            if m[9] != expect:
                raise RuntimeError(f"{layout}: the trainer says {m[9]!r}, expected {expect!r}")
            results[layout].append((float(m[10]), float(m[11]), float(m[12])))
    size = Manifest.read(step_dir(source, committed_steps(source)[0])).size_bytes
    shutil.rmtree(source)

    def med(layout, i):
        return statistics.median(r[i] for r in results[layout])

    print(f"3. Reshaped load: a {size / 1e6:,.0f} MB checkpoint written at (tp,pp,dp)={written}, loaded at "
          f"{world} ranks; median of {args.repeats}; files in the page cache")
    print()
    print("| loaded at | how | restore total s | vs same | checksums s | load s | vs same |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layout in layouts:
        how = "same layout (baseline)" if layout == written else "reshaped"
        print(f"| {layout} | {how} | {med(layout, 0):.3f} | {med(layout, 0) / med(written, 0):.2f}x | "
              f"{med(layout, 1):.3f} | {med(layout, 2):.3f} | {med(layout, 2) / med(written, 2):.2f}x |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="abc", help="which figures: any of a (throughput), b (blocked), "
                                                       "c (reshaped load); b includes a's run")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="global batch size")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="steps of the runs of figures 1 and 2")
    parser.add_argument("--interval", type=int, default=4, help="a save every this many steps (figures 1, 2)")
    parser.add_argument("--ranks", type=int, default=1, help="data-parallel ranks for figures 1 and 2")
    parser.add_argument("--written", type=layout_arg, default=(1, 1, 2), help="figure 3's saving layout")
    parser.add_argument("--reshaped", type=layout_arg, nargs="+", default=[(2, 1, 1), (1, 2, 1)],
                        help="figure 3's other layouts (same number of ranks)")
    parser.add_argument("--repeats", type=int, default=1, help="loads per layout in figure 3 (median)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the temporary checkpoints (and dd's file) go; default: the system's tempdir")
    args = parser.parse_args()
    if args.steps <= args.interval:
        parser.error("--steps must allow at least one save before the final one (steps > interval)")
    machine = (f"{platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
               f"{os.cpu_count()} CPUs)")
    print(f"Checkpoint benchmark, {machine}; model layers {args.layers}, hidden {args.hidden}, heads {args.heads}, "
          f"seq {args.seq}, global batch {args.batch}")
    print(flush=True)
    with tempfile.TemporaryDirectory(prefix="rh-ckpt-bench-", dir=args.dir) as tmp:
        directory = Path(tmp) / "ckpt"
        directory.mkdir()
        bench = Bench(args, Path(tmp))
        if "a" in args.parts or "b" in args.parts:
            part_a_b(bench, args, directory)
        if "c" in args.parts:
            part_c(bench, args, directory)


if __name__ == "__main__":
    main()
