"""Client commands for sweeps: `roundhouse sweep submit|get|list|cancel`, over gRPC (SweepService).

Like the job commands they import nothing of the control plane's internals or of the ranks: only the client,
the sweep spec contract and the API's messages (an import-linter contract in pyproject.toml)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from contract.errors import SpecError
from contract.sweep import load_sweep_file, sweep_to_proto
from orchestrator.cli.common import EXIT_INTERRUPTED, CancelTimeout, console, errors, fail, poll_until
from orchestrator.cli.jobs import Output, OutputFormat, Server, TlsCa, Token
from orchestrator.cli.render import STATE_STYLE, duration, message_json, print_json, state_text
from orchestrator.client import ClientError, JobClient, connect
from roundhouse.v1 import sweep_pb2

app = typer.Typer(help="µP sweeps: tune a small proxy, then train the target with the best hyperparameters.",
                  no_args_is_help=True)

SweepName = Annotated[str, typer.Argument(help="sweep name: NAME or sweeps/NAME", metavar="NAME", show_default=False)]
TERMINAL = frozenset({sweep_pb2.SWEEP_STATE_SUCCEEDED, sweep_pb2.SWEEP_STATE_FAILED, sweep_pb2.SWEEP_STATE_CANCELLED})
POLL_SECONDS = 1.0


def _connect(server: str | None, token: str | None, tls_ca: str | None) -> JobClient:
    try:
        return connect(server, token, tls_ca)
    except ClientError as exc:
        fail(str(exc))


def sweep_state_name(value: int) -> str:
    return sweep_pb2.SweepState.Name(value).removeprefix("SWEEP_STATE_")


def sweep_state_text(value: int) -> Text:
    name = sweep_state_name(value)
    return Text(name, style=STATE_STYLE.get(name, "cyan" if name in ("TUNING", "TRAINING_TARGET") else ""))


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="sweep spec (YAML)", metavar="FILE", show_default=False)],
    wait: Annotated[bool, typer.Option("--wait", help="follow the sweep until it ends; exit 0 only if its target "
                                                      "SUCCEEDED")] = False,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Validate a sweep spec, submit it, and optionally follow it to the end."""
    try:
        spec, warnings = load_sweep_file(str(file))
    except SpecError as exc:
        errors.print(Text(f"{file}: invalid sweep spec", style="bold red"))
        for violation in exc.violations:
            errors.print(Text(f"  {violation.field or '(spec)'}: {violation.description}"))
        raise typer.Exit(2) from None
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}", 2)
    for warning in warnings:
        errors.print(Text.assemble(("warning: ", "bold yellow"), warning))
    with _connect(server, token, tls_ca) as client:
        try:
            sweep = client.create_sweep(sweep_to_proto(spec))
        except ClientError as exc:
            fail(str(exc))
        console.print(Text.assemble((sweep.name, "bold"), f" created ({len(sweep.trials)} trials, at most "
                                                           f"{spec.max_parallel} at once; target jobs/"
                                                           f"{spec.target_job_name})"))
        if not wait:
            return
        final = _follow(client, sweep.name)
    raise typer.Exit(0 if final.state == sweep_pb2.SWEEP_STATE_SUCCEEDED else 1)


def _follow(client: JobClient, name: str) -> sweep_pb2.Sweep:
    """Prints each change of state and each trial's end until the sweep ends."""
    seen: set[tuple[str, int]] = set()
    last_state = None
    sweep = None
    try:
        for sweep in client.watch_sweep(name):
            for trial in sweep.trials:
                if trial.HasField("objective") and (trial.job, trial.state) not in seen:
                    seen.add((trial.job, trial.state))
                    console.print(Text.assemble(f"  {trial.job} lr={trial.learning_rate:g}: ", state_text(trial.state),
                                                f"  objective {_objective(trial)}"))
            if (sweep.state, sweep.state_reason) != last_state:
                last_state = (sweep.state, sweep.state_reason)
                console.print(Text.assemble((sweep.name, "bold"), ": ", sweep_state_text(sweep.state),
                                            f" {sweep.state_reason}  {sweep.state_message}".rstrip()))
    except ClientError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        errors.print(f"\nstopped following; {name} goes on (`roundhouse sweep cancel` stops it)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    while sweep is not None and sweep.state not in TERMINAL:  # the stream closed early (a server restart)
        time.sleep(POLL_SECONDS)
        try:
            sweep = client.get_sweep(name)
        except ClientError as exc:
            fail(str(exc))
    return sweep


@app.command()
def get(name: SweepName, output: Output = OutputFormat.table, server: Server = None, token: Token = None,
        tls_ca: TlsCa = None) -> None:
    """Show one sweep: its state, its trials and their objectives, the chosen point, the target, the cost."""
    with _connect(server, token, tls_ca) as client:
        try:
            sweep = client.get_sweep(name)
        except ClientError as exc:
            fail(str(exc))
    if output is OutputFormat.json:
        print_json(message_json(sweep))
        return
    console.print(Text.assemble((sweep.name, "bold"), ": ", sweep_state_text(sweep.state),
                                f"  {sweep.state_reason} {sweep.state_message}".rstrip()))
    for warning in sweep.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), warning))
    table = Table(box=None, pad_edge=False)
    for column in ("TRIAL", "LR", "WD", "SEED", "STATE", "STEPS", "OBJECTIVE", "WALL"):
        table.add_column(column)
    for trial in sweep.trials:
        chosen = trial.job == sweep.best_trial
        table.add_row(Text(trial.job.removeprefix("jobs/") + (" *" if chosen else ""), style="bold" if chosen else ""),
                      f"{trial.learning_rate:g}", f"{trial.weight_decay:g}", str(trial.seed),
                      state_text(trial.state) if trial.state else Text("-"), str(trial.steps), _objective(trial),
                      duration(trial.wall_seconds))
    console.print(table)
    if sweep.best_trial:
        console.print(f"chosen: {sweep.best_trial} (learning_rate={sweep.best_learning_rate:g}, "
                      f"weight_decay={sweep.best_weight_decay:g})")
    if sweep.target_job:
        console.print(Text.assemble(f"target: {sweep.target_job} ", state_text(sweep.target_state)))
    console.print(f"tuning cost: {100 * sweep.tuning_flops_ratio:.1f} % of the target's FLOPs, "
                  f"{duration(sweep.tuning_wall_seconds)} of trial wall time")


@app.command("list")
def list_sweeps(
    page_size: Annotated[int, typer.Option(min=1, max=1000, help="sweeps per page")] = 50,
    output: Output = OutputFormat.table,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """List sweeps, newest first."""
    with _connect(server, token, tls_ca) as client:
        try:
            sweeps = client.list_sweeps(page_size=page_size).sweeps
        except ClientError as exc:
            fail(str(exc))
    if output is OutputFormat.json:
        print_json([message_json(s) for s in sweeps])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "TRIALS", "BEST LR", "TARGET"):
        table.add_column(column)
    for sweep in sweeps:
        ended = sum(1 for t in sweep.trials if t.HasField("objective"))
        table.add_row(sweep.name.removeprefix("sweeps/"), sweep_state_text(sweep.state), f"{ended}/{len(sweep.trials)}",
                      f"{sweep.best_learning_rate:g}" if sweep.best_trial else "-",
                      Text.assemble(sweep.target_job.removeprefix("jobs/") + " ", state_text(sweep.target_state))
                      if sweep.target_job else Text("-"))
    console.print(table)


@app.command()
def cancel(
    name: SweepName,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until its trials and target have stopped "
                                                                "and it is CANCELLED")] = True,
    timeout: CancelTimeout = 300.0,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Cancel a sweep: its running trials (or its target) are cancelled and it ends CANCELLED."""
    with _connect(server, token, tls_ca) as client:
        try:
            sweep = client.cancel_sweep(name)
            if wait:
                sweep = poll_until(sweep, lambda s: client.get_sweep(s.name), lambda s: s.state in TERMINAL,
                                   timeout, POLL_SECONDS)
        except ClientError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(Text.assemble((sweep.name, "bold"), ": ", sweep_state_text(sweep.state),
                                f"  {sweep.state_message}" if sweep.state_message else ""))
    if wait and sweep.state != sweep_pb2.SWEEP_STATE_CANCELLED:
        raise typer.Exit(1)


def _objective(trial: sweep_pb2.Trial) -> str:
    if not trial.HasField("objective"):
        return "-"
    return "inf" if math.isinf(trial.objective) else f"{trial.objective:.4f}"

