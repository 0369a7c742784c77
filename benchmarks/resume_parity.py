"""Resume parity of one rank's checkpoints, on whatever device the trainer finds (made for a GPU machine, where
the test suite cannot run; on the CPU tests/e2e/test_checkpoint.py checks the same and more).

For each precision: a reference run of 20 steps with async saves every 5; a run killed (exit 17) at step 13
with sync saves, so steps 5 and 10 are committed; and a run resumed from that directory. It prints the losses
of steps 11-20 of the reference and the resumed run; they must be equal (the printed 9 significant digits), and
the script exits 1 if they are not.

    python -m benchmarks.resume_parity [--precision bf16 fp32] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from orchestrator.launcher.local import free_port
from contract.spec import parse_spec

STEP = re.compile(r"^step (\d+)/\d+ loss (\S+)", re.M)
CHECKPOINT_LINE = re.compile(r"^.*checkpoint (?:step \d+ committed|restored).*$", re.M)
STEPS, INTERVAL, KILLED_AT, RESUMED_FROM = 20, 5, 13, 10


def run(name: str, precision: str, checkpoints: Path, async_save: bool, logs: Path,
        extra_env: dict[str, str] | None = None) -> tuple[int, dict[int, str]]:
    """One rank of the trainer as a plain process; (exit code, step -> loss as printed)."""
    spec = parse_spec({"name": "resume-parity",
                       "model": {"layers": 4, "hidden_size": 512, "heads": 8, "seq_length": 256},
                       "training": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2,
                                    "learning_rate": 1e-3, "warmup_steps": 2, "seed": 3, "precision": precision},
                       "checkpoint": {"interval": INTERVAL, "async_save": async_save, "keep_last": 3}})
    spec_file = logs / f"{name}.json"
    spec_file.write_text(spec.model_dump_json())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROUNDHOUSE_", "RH_"))}
    env = {**base, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "ROUNDHOUSE_SPEC_FILE": str(spec_file),
           "ROUNDHOUSE_CHECKPOINT_DIR": str(checkpoints), "ROUNDHOUSE_TEST_HOOKS": "1", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trainers"], env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    (logs / f"{name}.log").write_text(output)
    print(f"{name}: exit {done.returncode} in {time.perf_counter() - started:.1f} s", flush=True)
    for line in CHECKPOINT_LINE.findall(output):
        print("   ", line.strip())
    return done.returncode, {int(m[1]): m[2] for m in STEP.finditer(output)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None, help="keep the logs here (default: a temporary dir)")
    args = parser.parse_args()
    import torch

    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}")
    ok = True
    for precision in args.precision:
        with tempfile.TemporaryDirectory() as tmp:
            logs = args.out or Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            a, reference = run(f"{precision}-reference", precision, Path(tmp) / "ck-a", True, logs)
            b, _ = run(f"{precision}-killed", precision, Path(tmp) / "ck-b", False, logs,
                       {"RH_FAULT_EXIT_AT_STEP": str(KILLED_AT)})
            c, resumed = run(f"{precision}-resumed", precision, Path(tmp) / "ck-b", True, logs)
        after = range(RESUMED_FROM + 1, STEPS + 1)
        equal = [s for s in after if s in resumed and resumed[s] == reference.get(s)]
        print(f"{precision}: exits {a} {b} {c} (expected 0 17 0); resumed steps {sorted(resumed)}; steps "
              f"{after.start}-{after.stop - 1} equal to the reference: {len(equal)}/{len(after)}")
        for s in after:
            print(f"    step {s}: reference {reference.get(s)} resumed {resumed.get(s)}")
        ok &= (a, b, c) == (0, 17, 0) and sorted(resumed) == list(after) and len(equal) == len(after)
    print("resume parity: ALL EQUAL" if ok else "resume parity: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
