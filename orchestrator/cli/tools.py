"""Tools that run rank-side code on this machine: `roundhouse mup coord-check`.

The CLI imports nothing of the ranks (an import-linter contract): each tool runs its rank-side module in a
child interpreter, the same one the CLI runs in, and passes its exit code on."""

from __future__ import annotations

import subprocess
import sys

import typer

mup_app = typer.Typer(help="µP hyperparameter transfer: check a parametrization before a sweep.",
                      no_args_is_help=True)


@mup_app.command("coord-check", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def coord_check(ctx: typer.Context,
                spec: str = typer.Argument(..., help="a job spec (YAML) whose model.mup section is checked")) -> None:
    """Trains the spec's model for a few steps at several widths and prints, per layer, the slope of log
    activation change against log width (about 0 under µP; about 1 or more under the standard parametrization).
    Options: --widths 64,128,256,512 --steps 5 --plot out.png --standard."""
    raise typer.Exit(subprocess.call([sys.executable, "-m", "trainers.coord_check", spec, *ctx.args]))
