"""python -m offload plan --params N (--profile NAME | --measure) [--dp D] [--tp T] [--pp P] ...
python -m offload calibrate [--out FILE]
python -m offload profiles"""

from __future__ import annotations

import argparse
import sys

from offload.subgroups import DEFAULT_SUBGROUP_SIZE

_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """1000000, 1e9, 1.3B, 350M, 7b -> an integer count."""
    t = text.strip().replace("_", "").replace(",", "")
    scale = 1
    if t and t[-1].upper() in _SUFFIX:
        scale, t = _SUFFIX[t[-1].upper()], t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1300000000, 1.3e9, 1.3B)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="does the model fit with and without offload, and what would run")
    p.add_argument("--params", type=parse_count, required=True, help="parameter count (e.g. 1.3B, 7e9)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="a machine profile by name or JSON path (see `profiles`)")
    source.add_argument("--measure", action="store_true", help="calibrate this machine's device and CPU now")
    p.add_argument("--dp", type=parse_count, default=1)
    p.add_argument("--tp", type=parse_count, default=1)
    p.add_argument("--pp", type=parse_count, default=1)
    p.add_argument("--weight-bytes", type=int, choices=(2, 4), default=2, help="2 for bf16/fp16, 4 for fp32")
    p.add_argument("--activation-gib", type=float, default=0.0, help="activation memory per rank, GiB")
    p.add_argument("--device-memory-gib", type=float, help="device memory (default: the profile's)")
    p.add_argument("--subgroup-size", type=parse_count, default=DEFAULT_SUBGROUP_SIZE)

    c = commands.add_parser("calibrate", help="measure this machine's rates and print (or save) a profile")
    c.add_argument("--out", help="write the profile JSON here")
    c.add_argument("--numel", type=parse_count, default=1 << 24)

    commands.add_parser("profiles", help="list the machine profiles shipped with Roundhouse")

    args = parser.parse_args(argv)
    from offload.perf_model import known_profiles, load_profile
    if args.command == "profiles":
        for name in known_profiles():
            profile = load_profile(name)
            print(f"{name}\t{'estimate' if profile.estimate else 'measured'}\t{profile.source}")
        return 0
    if args.command == "calibrate":
        from offload.calibrate import default_device, measure
        profile = measure(default_device(), numel=args.numel)
        text = profile.to_json()
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)
        return 0

    from offload.plan import GiB, plan
    if args.measure:
        from offload.calibrate import default_device, measure
        profile = measure(default_device())
    else:
        try:
            profile = load_profile(args.profile)
        except ValueError as e:
            parser.error(f"--profile: {e}")
    if args.activation_gib < 0:
        parser.error("--activation-gib must be >= 0")
    if args.device_memory_gib is not None and args.device_memory_gib <= 0:
        parser.error("--device-memory-gib must be positive")
    report = plan(args.params, profile, dp=args.dp, tp=args.tp, pp=args.pp, weight_bytes=args.weight_bytes,
                  activation_bytes=int(args.activation_gib * GiB), subgroup_size=args.subgroup_size,
                  device_memory_bytes=None if args.device_memory_gib is None else int(args.device_memory_gib * GiB))
    print(report.explain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
