"""python -m offload plan --params N (--profile NAME | --measure) [--dp D] [--tp T] [--pp P] ...
python -m offload plan --spec FILE [--profile NAME | --measure]
python -m offload calibrate [--out FILE]
python -m offload profiles"""

from __future__ import annotations

import argparse
import math
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


def sizing_from_spec(path: str):
    """What `plan` needs from a job spec file: the exact parameter count (the trainer's parameter table), the
    layout, the weights' bytes and the subgroup size; and the spec itself (its training.offload.profile,
    resources.accelerator_memory and what the activations are estimated from)."""
    from contract.errors import SpecError
    from contract.spec import load_spec_file
    from trainers.model import GPTConfig, parameter_table

    try:
        spec = load_spec_file(path)
    except SpecError as e:
        raise ValueError(str(e)) from None
    table = parameter_table(GPTConfig.from_spec(spec.model))
    params = sum(math.prod(row.shape) for row in table.values())
    p, t = spec.parallelism, spec.training
    return ({"params": params, "dp": p.dp, "tp": p.tp, "pp": p.pp,
             "weight_bytes": 2 if t.precision == "bf16" else 4, "subgroup_size": t.offload.subgroup_size},
            spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="does the model fit with and without offload, and what would run")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--params", type=parse_count, help="parameter count (e.g. 1.3B, 7e9)")
    model.add_argument("--spec", help="a job spec (YAML): its model's parameters, layout, precision and "
                                      "training.offload (subgroup size; profile unless --profile/--measure)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--profile", help="a machine profile by name or JSON path (see `profiles`)")
    source.add_argument("--measure", action="store_true", help="calibrate this machine's device and CPU now")
    p.add_argument("--dp", type=parse_count, help="default 1, or the spec's")
    p.add_argument("--tp", type=parse_count, help="default 1, or the spec's")
    p.add_argument("--pp", type=parse_count, help="default 1, or the spec's")
    p.add_argument("--weight-bytes", type=int, choices=(2, 4),
                   help="2 for bf16/fp16, 4 for fp32 (default 2, or the spec's training.precision)")
    p.add_argument("--activation-gib", type=float,
                   help="activation memory per rank, GiB (default 0, or estimated from the spec)")
    p.add_argument("--device-memory-gib", type=float,
                   help="device memory (default: the spec's resources.accelerator_memory, else the profile's)")
    p.add_argument("--subgroup-size", type=parse_count,
                   help=f"default {DEFAULT_SUBGROUP_SIZE:,}, or the spec's training.offload.subgroup_size")

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
    sizing = {"params": args.params, "dp": 1, "tp": 1, "pp": 1, "weight_bytes": 2,
              "subgroup_size": DEFAULT_SUBGROUP_SIZE}
    spec = None
    if args.spec:
        try:
            sizing, spec = sizing_from_spec(args.spec)
        except (OSError, ValueError) as e:
            parser.error(f"--spec: {e}")
        spec_profile = spec.training.offload.profile
        if not args.measure and not args.profile:
            if spec_profile is None:
                parser.error("--spec: the spec names no training.offload.profile; give --profile NAME or --measure")
            args.profile = spec_profile
    elif not args.measure and not args.profile:
        parser.error("one of --profile or --measure is required")
    for key in ("dp", "tp", "pp", "weight_bytes", "subgroup_size"):
        if getattr(args, key) is not None:
            sizing[key] = getattr(args, key)
    if args.measure:
        from offload.calibrate import default_device, measure
        profile = measure(default_device())
    else:
        try:
            profile = load_profile(args.profile)
        except ValueError as e:
            parser.error(f"--profile: {e}")
    if args.activation_gib is not None and args.activation_gib < 0:
        parser.error("--activation-gib must be >= 0")
    if args.device_memory_gib is not None and args.device_memory_gib <= 0:
        parser.error("--device-memory-gib must be positive")
    activation_bytes = 0 if args.activation_gib is None else int(args.activation_gib * GiB)
    device_memory_bytes = None if args.device_memory_gib is None else int(args.device_memory_gib * GiB)
    if spec is not None:
        # The control plane's planner sizes a job the same way (contract.sizing): activations estimated from
        # the spec, the device memory the spec declares.
        from contract.layout import Layout
        from contract.sizing import approximate_activation_bytes, parse_quantity
        layout = Layout(sizing["tp"], sizing["pp"], sizing["dp"])
        if args.activation_gib is None:
            activation_bytes = approximate_activation_bytes(spec.model, spec.training, layout)
            print(f"activations estimated from the spec at {layout}: {activation_bytes / GiB:.1f} GiB per rank "
                  "(--activation-gib to give your own)")
        if args.device_memory_gib is None and spec.resources.accelerator_memory is not None:
            device_memory_bytes = int(parse_quantity(spec.resources.accelerator_memory))
            print(f"device memory from the spec's resources.accelerator_memory: "
                  f"{spec.resources.accelerator_memory} per rank")
    report = plan(sizing["params"], profile, dp=sizing["dp"], tp=sizing["tp"], pp=sizing["pp"],
                  weight_bytes=sizing["weight_bytes"], activation_bytes=activation_bytes,
                  subgroup_size=sizing["subgroup_size"], device_memory_bytes=device_memory_bytes)
    print(report.explain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
