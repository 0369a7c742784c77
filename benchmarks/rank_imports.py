"""CPU time a rank spends importing its libraries (torch, megatron-core's tensor-parallel layers, DeepSpeed, the
trainer), with megatron-core's torch.compile decorators applied as the library does and as a rank does it
(trainers.lean_imports). Median of interleaved repeats, each in a fresh interpreter; CPU seconds (user + system
of the child), which a busy machine inflates far less than wall time.

    python -m benchmarks.rank_imports [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys

LIBRARY_DEFAULT = "import torch, megatron.core.tensor_parallel, deepspeed, trainers.main"
AS_A_RANK = ("from trainers.lean_imports import import_megatron_without_torch_compile; "
             "import_megatron_without_torch_compile(); " + LIBRARY_DEFAULT)


def cpu_seconds(code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu_seconds(LIBRARY_DEFAULT)  # warm the page cache and bytecode first
    library, rank = [], []
    for _ in range(args.repeats):
        library.append(cpu_seconds(LIBRARY_DEFAULT))
        rank.append(cpu_seconds(AS_A_RANK))
    ratios = sorted(r / b for r, b in zip(rank, library))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"imports as the libraries do: median {statistics.median(library):.2f} CPU s "
          f"(min {min(library):.2f}, max {max(library):.2f})")
    print(f"imports as a rank does:      median {statistics.median(rank):.2f} CPU s "
          f"(min {min(rank):.2f}, max {max(rank):.2f})")
    print(f"ratio rank / library: median {statistics.median(ratios):.2f} "
          f"(spread {ratios[0]:.2f}-{ratios[-1]:.2f} over {args.repeats} interleaved pairs)")


if __name__ == "__main__":
    main()
