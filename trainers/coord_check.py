"""The µP coordinate check: does each layer's update stay the same size per coordinate as the model widens?

    python -m trainers.coord_check SPEC [--widths 64,128,256,512] [--steps 5] [--plot out.png]

For each width, the spec's model (its hidden size replaced by the width, its head count kept, so the head
dimension grows too and the attention scale is checked with the rest) is built from the trainer's own layers
(trainers.model, in this process at tp = 1) and trained for a few AdamW steps on the built-in corpus with the
spec's learning rate and weight decay. After each step the RMS per coordinate of the change since
initialisation of each layer's output (the embedding, every block, the logits) is measured on a fixed batch.
The slope of log(change) against log(width) is ~0 under a working µP (the change is Θ(1) per coordinate) and
~1 or more under the standard parametrization, where Adam's update of a width-d matrix moves its outputs ∝ d.

The spec's `model.mup` decides the parametrization; `--standard` drops it, to compare."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from dataclasses import dataclass

import torch

from contract.spec import JobSpec, load_spec_file
from trainers.data import TextData, load_corpus

DEFAULT_WIDTHS = (64, 128, 256, 512)
BATCH = 4  # windows per step: enough to train, cheap at width 512


@dataclass(frozen=True)
class CoordCheck:
    widths: list[int]
    layers: list[str]  # "embedding", "blocks.0", ..., "logits"
    # changes[step - 1][layer][width index]: RMS per coordinate of (output after `step` steps - initial output)
    changes: list[dict[str, list[float]]]

    def slopes(self) -> list[dict[str, float]]:
        """slopes[step - 1][layer]: least-squares slope of log(change) against log(width)."""
        xs = [math.log(w) for w in self.widths]
        return [{layer: _slope(xs, [math.log(c) for c in by_layer[layer]]) for layer in self.layers}
                for by_layer in self.changes]


def _slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def run(spec: JobSpec, widths: list[int], steps: int, standard: bool = False) -> CoordCheck:
    """The coordinate check of `spec`'s model at each width (µP as the spec says, or the standard
    parametrization when `standard`). Sets up a one-rank process group (megatron's layers need one)."""
    from trainers import parallel

    owns_group = not torch.distributed.is_initialized()
    environment = dict(os.environ)  # parallel.setup sets RANK, MASTER_PORT, ...: put back afterwards
    if owns_group:
        parallel.setup(parallel.ParallelDims(tp=1, pp=1, dp=1, rank=0), "127.0.0.1", _free_port(), 0)
    try:
        data = TextData(load_corpus(spec.data.path), spec.model.seq_length, spec.training.seed)
        batches = [data.train_batch(step, BATCH) for step in range(1, steps + 1)]
        probe = data.val_batch(windows=BATCH)
        per_width = [_changes(spec, width, batches, probe.inputs, standard) for width in widths]
    finally:
        if owns_group:
            parallel.teardown()
            os.environ.clear()
            os.environ.update(environment)
    layers = list(per_width[0][0])
    changes = [{layer: [per_width[w][step][layer] for w in range(len(widths))] for layer in layers}
               for step in range(steps)]
    return CoordCheck(widths=list(widths), layers=layers, changes=changes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_at_width(spec: JobSpec, width: int, standard: bool):
    from trainers.model import GPTConfig

    model = spec.model.model_copy(update={"hidden_size": width, **({"mup": None} if standard else {})})
    if width % model.heads or (model.positions == "rotary" and (width // model.heads) % 2):
        raise ValueError(f"--widths: {width} does not split into {model.heads} heads (model.heads)")
    return GPTConfig.from_spec(model)


def _changes(spec: JobSpec, width: int, batches, probe: torch.Tensor, standard: bool) -> list[dict[str, float]]:
    """For each step, each layer's RMS output change since initialisation, at one width."""
    from trainers.model import Block, Embedding, Head, global_named_parameters, loss_fn, parameter_table
    from trainers.optim import build_optimizer, set_lr

    config = _model_at_width(spec, width, standard)
    seed = spec.training.seed
    layers = [Embedding(config, 1, 0, seed)] + [Block(config, 1, 0, seed, i) for i in range(config.layers)]
    layers.append(Head(config, 1, 0, seed))
    model = torch.nn.Sequential(*layers)
    optimizer = build_optimizer(global_named_parameters(model), parameter_table(config), spec.training).optimizer

    @torch.no_grad()
    def outputs() -> dict[str, torch.Tensor]:
        out, x = {}, probe
        for layer in layers:
            x = layer(x)
            out["logits" if isinstance(layer, Head) else layer.global_prefix] = x.clone()
        return out

    initial = outputs()
    changes = []
    for batch in batches:
        set_lr(optimizer, spec.training.learning_rate)  # constant: the schedule is not what is checked
        optimizer.zero_grad()
        loss_fn(model(batch.inputs), batch.targets).backward()
        optimizer.step()
        now = outputs()
        changes.append({name: (now[name] - initial[name]).square().mean().sqrt().item() for name in initial})
    return changes


def plot(check: CoordCheck, path: str, title: str) -> None:
    """One panel per step: each layer's change against width, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(check.changes)
    figure, axes = plt.subplots(1, steps, figsize=(3.2 * steps, 3.2), sharey=True, squeeze=False)
    for step, axis in enumerate(axes[0]):
        for layer in check.layers:
            axis.plot(check.widths, check.changes[step][layer], marker="o", label=layer)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"step {step + 1}")
        axis.set_xlabel("width")
    axes[0][0].set_ylabel("RMS output change")
    axes[0][-1].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.coord_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a job spec (YAML); its model.mup section decides the parametrization")
    parser.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS)),
                        help="comma-separated hidden sizes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="AdamW steps per width (default %(default)s)")
    parser.add_argument("--plot", help="write a PNG of change against width here")
    parser.add_argument("--standard", action="store_true", help="ignore model.mup: the standard parametrization")
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        parser.error(f"--widths: {args.widths!r} is not a comma-separated list of integers")
    if len(widths) < 2 or args.steps < 1:
        parser.error("--widths needs at least two widths and --steps at least 1")
    try:
        spec = load_spec_file(args.spec)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # unreadable, not UTF-8, or an invalid spec
        print(f"coord-check: {args.spec}: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parametrization = "standard" if args.standard or spec.model.mup is None else "µP"
    check = run(spec, widths, args.steps, standard=args.standard)
    slopes = check.slopes()
    print(f"coordinate check ({parametrization}): slope of log(RMS output change) against log(width), "
          f"widths {widths}")
    print("step  " + "  ".join(f"{layer:>10}" for layer in check.layers))
    for step, by_layer in enumerate(slopes, start=1):
        print(f"{step:>4}  " + "  ".join(f"{by_layer[layer]:>+10.3f}" for layer in check.layers))
    if args.plot:
        plot(check, args.plot, f"coordinate check, {parametrization}")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
