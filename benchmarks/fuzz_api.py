"""Property-based fuzzing of the API at scale: the properties of tests/support/fuzz.py (every refusal
INVALID_ARGUMENT with a field path, or another code a client can act on; never UNKNOWN or INTERNAL; no row for
a refused spec) over 10,000 cases by default, through a real gRPC server with the reconciler off.

Prints the answers by method and code, and the time per case against a valid CreateJob's, measured the same
way in the same run (the baseline: what a case costs when nothing is refused). Exits 1 at the first case that
breaks a property, with hypothesis' smallest example of it.

    python -m benchmarks.fuzz_api [--cases 10000] [--postgres URL] [--seed N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

from contract.spec import parse_spec, spec_to_proto
from orchestrator.config import token_file
from orchestrator.server import ControlPlane, ServerSettings
from tests.support.fuzz import FUZZ_LIMITS, ApiFuzzer, job_specs, list_jobs_requests, names, sweep_specs

# The cases' shares by method.
SHARES = {"CreateJob": 0.5, "CreateSweep": 0.2, "ListJobs": 0.25, "GetJob": 0.05}
BASELINE_CALLS = 300


def run(fuzzer: ApiFuzzer, cases: int, random_seed: int) -> float:
    """Runs the cases; returns their wall time in seconds."""
    targets = {"CreateJob": (job_specs(), fuzzer.create_job), "CreateSweep": (sweep_specs(), fuzzer.create_sweep),
               "ListJobs": (list_jobs_requests(), fuzzer.list_jobs), "GetJob": (names(), fuzzer.get_job)}
    started = time.perf_counter()
    for method, share in SHARES.items():
        strategy, call = targets[method]
        count = max(1, round(cases * share))
        fuzz = seed(random_seed)(settings(max_examples=count, deadline=None, database=None,
                                          suppress_health_check=list(HealthCheck))(given(value=strategy)(_case(call))))
        print(f"{method}: {count} cases…", flush=True)
        fuzz()
    return time.perf_counter() - started


def _case(call):
    """A test function of one drawn value, for hypothesis' `given`."""
    def case(value) -> None:
        call(value)
    return case


def baseline(fuzzer: ApiFuzzer) -> float:
    """Seconds per valid CreateJob (each accepted), called the way the cases are."""
    specs = [spec_to_proto(parse_spec({"name": f"baseline-{i}"})) for i in range(BASELINE_CALLS)]
    started = time.perf_counter()
    for spec in specs:
        fuzzer.create_job(spec)
    return (time.perf_counter() - started) / BASELINE_CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL database instead of SQLite")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        plane = ControlPlane(ServerSettings(home=home, db_url=args.postgres, grpc_port=0, http_port=0,
                                            reconcile=False, max_ranks=16, limits=FUZZ_LIMITS))
        plane.start()
        fuzzer = ApiFuzzer(plane, token_file(home).read_text().strip())
        try:
            per_valid = baseline(fuzzer)
            seconds = run(fuzzer, args.cases, args.seed)
        except AssertionError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            sys.exit(1)
        finally:
            fuzzer.close()
            plane.stop()
    print(f"\nAPI fuzzing, {platform.node()} ({platform.processor() or platform.machine()}), "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}, seed {args.seed}")
    fuzzer.tally.codes["CreateJob"]["OK"] -= BASELINE_CALLS  # the baseline's calls are not cases
    for method, codes in fuzzer.tally.codes.items():
        shown = ", ".join(f"{code} {count}" for code, count in sorted(codes.items()))
        print(f"  {method:<12} {shown}")
    total = sum(sum(codes.values()) for codes in fuzzer.tally.codes.values())
    per_case = seconds / total
    print(f"{total} cases in {seconds:.1f} s: {1000 * per_case:.2f} ms per case; a valid CreateJob "
          f"{1000 * per_valid:.2f} ms (ratio {per_case / per_valid:.2f}); every property held")


if __name__ == "__main__":
    main()
