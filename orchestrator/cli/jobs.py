"""Client commands: submit, watch, list, get, logs and cancel jobs on a control plane, over gRPC.

They import nothing of the control plane's internals or of the ranks (an import-linter contract in
pyproject.toml holds them to it): only the client, the job spec contract and the API's messages."""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from contract.spec import SpecError, load_spec_file, parse_spec, spec_to_proto
from orchestrator import config
from orchestrator.cli.common import EXIT_INTERRUPTED, CancelTimeout, console, errors, fail, poll_until
from orchestrator.cli.render import (STATE_STYLE, TERMINAL, checkpoints_lines, event_line, job_details, jobs_table,
                                     layout, loss_text, message_json, print_json, speed_text, state_name, state_text)
from orchestrator.client import ClientError, JobClient, connect, short_name
from roundhouse.v1 import job_pb2
from roundhouse.v1 import job_service_pb2 as js

app = typer.Typer()

# `roundhouse get` shows this many of the newest checkpoints (retention usually keeps fewer).
GET_CHECKPOINTS = 20
# How long `submit --wait` and `watch` keep trying to reach a control plane that went away (restarted, say).
RECONNECT_SECONDS = 60.0
POLL_SECONDS = 0.5


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


Server = Annotated[str | None, typer.Option("--server", envvar="ROUNDHOUSE_SERVER", show_default=False, metavar="HOST:PORT",
                                            help=f"control plane address [default: {config.DEFAULT_SERVER}]")]
Token = Annotated[str | None, typer.Option("--token", envvar="ROUNDHOUSE_TOKEN", show_default=False, metavar="TOKEN",
                                           help="API bearer token [default: the admin token of a local server]")]
TlsCa = Annotated[str | None, typer.Option("--tls-ca", envvar="ROUNDHOUSE_TLS_CA", show_default=False, metavar="FILE",
                                           help="reach the control plane over TLS, trusting this CA (PEM); "
                                                "a grpcs:// server uses TLS with the system's CAs without it")]
Output = Annotated[OutputFormat, typer.Option("--output", "-o", case_sensitive=False, help="table or json")]
JobName = Annotated[str, typer.Argument(help="job name: NAME or jobs/NAME", metavar="NAME", show_default=False)]


def _connect(server: str | None, token: str | None, tls_ca: str | None) -> JobClient:
    try:
        return connect(server, token, tls_ca)
    except ClientError as exc:
        fail(str(exc))


def parse_state(text: str) -> int:
    """A JobState from "running", "RUNNING" or "JOB_STATE_RUNNING"."""
    name = text.strip().upper()
    name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
    if name == "JOB_STATE_UNSPECIFIED" or name not in job_pb2.JobState.keys():  # noqa: SIM118 (an enum wrapper)
        valid = ", ".join(state_name(v).lower() for v in job_pb2.JobState.values() if v)
        raise typer.BadParameter(f"{text!r} is not a job state (one of: {valid})", param_hint="--state")
    return job_pb2.JobState.Value(name)


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--label")
        labels[key.strip()] = value.strip()
    return labels


# -- submit / watch ----------------------------------------------------------------------------------------

@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="job spec (YAML)", metavar="FILE", show_default=False)],
    wait: Annotated[bool, typer.Option("--wait", help="show progress and events until the job ends; exit 0 "
                                                      "only if it SUCCEEDED")] = False,
    name: Annotated[str | None, typer.Option(help="submit under this name instead of the spec's",
                                             show_default=False)] = None,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Validate a job spec, submit it, and optionally watch it to the end."""
    try:
        spec = load_spec_file(str(file))
        if name is not None:  # the same spec under another name, validated again
            spec = parse_spec({**spec.model_dump(mode="json", exclude_none=True), "name": name})
    except SpecError as exc:
        errors.print(Text(f"{file}: invalid job spec", style="bold red"))
        for violation in exc.violations:
            errors.print(Text(f"  {violation.field or '(spec)'}: {violation.description}"))
        raise typer.Exit(2) from None
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}", 2)
    with _connect(server, token, tls_ca) as client:
        try:
            job = client.create_job(spec_to_proto(spec))
        except ClientError as exc:
            fail(str(exc))
        console.print(Text.assemble((job.name, "bold"), f" created ({spec.world_size} ranks, layout {layout(job)}, "
                                                         f"{spec.training.steps} steps)"))
        if not wait:
            return
        final = _watch_until_it_ends(client, job.name)
    raise typer.Exit(0 if final.state == job_pb2.JOB_STATE_SUCCEEDED else 1)


@app.command("watch")
def watch_command(name: JobName, server: Server = None, token: Token = None,
        tls_ca: TlsCa = None) -> None:
    """Show a job's events and progress until it ends; exit 0 only if it SUCCEEDED."""
    with _connect(server, token, tls_ca) as client:
        final = _watch_until_it_ends(client, name)
    raise typer.Exit(0 if final.state == job_pb2.JOB_STATE_SUCCEEDED else 1)


def _watch_until_it_ends(client: JobClient, name: str) -> job_pb2.Job:
    try:
        return watch(client, name)
    except KeyboardInterrupt:
        errors.print(f"\nstopped watching; {name} keeps running (`roundhouse cancel {short_name(name)}` stops it)")
        raise typer.Exit(EXIT_INTERRUPTED) from None


class _StreamEnded(Exception):
    """The watch stream closed before the job ended (a server shutting down): reconnect."""


def _reconnectable(exc: BaseException) -> bool:
    return isinstance(exc, _StreamEnded) or (
        isinstance(exc, ClientError) and exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED))


def watch(client: JobClient, name: str) -> job_pb2.Job:
    """Shows a progress bar and each event until the job ends, and returns the job as it ended.

    If the stream breaks (the control plane restarted), it reconnects from the last event seen, for up to
    RECONNECT_SECONDS since the last news; then it gives up with an error (exit 1)."""
    last_event = 0
    last_news = time.monotonic()
    job: job_pb2.Job | None = None
    outage = False
    progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tokens/s"),
                        TimeRemainingColumn(), console=console)
    task = progress.add_task("QUEUED", total=None, loss="—", speed="—")

    def follow() -> job_pb2.Job:
        nonlocal last_event, last_news, job, outage
        for update in client.watch_job(name, after_event_id=last_event, after_step=-1):
            last_news = time.monotonic()
            if outage:
                progress.console.print(Text("reconnected", style="yellow"))
                outage = False
            for event in update.events:
                progress.console.print(event_line(event), soft_wrap=True)
                last_event = max(last_event, event.id)
            for point in update.metrics:
                if point.HasField("val_loss") and point.rank == 0:
                    progress.console.print(Text(f"step {point.step}: validation loss {point.val_loss:.4f}",
                                                style="dim"), soft_wrap=True)
            job = update.job
            progress.update(task, description=state_name(job.state), total=job.total_steps or None,
                            completed=job.current_step, loss=loss_text(job), speed=speed_text(job.tokens_per_second))
            if job.state in TERMINAL:
                return job
        raise _StreamEnded("the watch stream ended before the job did")

    def out_of_time(_: RetryCallState) -> bool:
        return time.monotonic() - last_news > RECONNECT_SECONDS

    def announce(state: RetryCallState) -> None:
        nonlocal outage
        if outage:
            return
        outage = True
        exc = state.outcome.exception()
        why = exc.code.name if isinstance(exc, ClientError) and exc.code else str(exc)
        progress.console.print(Text(f"lost the control plane ({why}); reconnecting for up to "
                                    f"{RECONNECT_SECONDS:.0f} s…", style="yellow"))

    retrying = Retrying(retry=retry_if_exception(_reconnectable), stop=out_of_time,
                        wait=wait_exponential(multiplier=0.25, max=4), before_sleep=announce, reraise=True)
    with progress:
        try:
            final = retrying(follow)
        except ClientError as exc:
            fail(str(exc) if job is None else f"{exc}\n(gave up watching {name}; `roundhouse get "
                                               f"{short_name(name)}` shows where it stands)")
        except _StreamEnded as exc:
            fail(f"{exc}; gave up after {RECONNECT_SECONDS:.0f} s")
    style = STATE_STYLE.get(state_name(final.state), "")
    summary = Text.assemble((final.name, "bold"), ": ", (state_name(final.state), f"bold {style}"))
    if final.state_message:
        summary.append(f"  {final.state_message}")
    console.print(summary, soft_wrap=True)
    return final


# -- list / get --------------------------------------------------------------------------------------------

@app.command("list")
def list_jobs(
    state: Annotated[list[str] | None, typer.Option(metavar="STATE", show_default=False,
                                                    help="only jobs in this state, e.g. running or "
                                                         "JOB_STATE_RUNNING (repeatable: any of them)")] = None,
    label: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", show_default=False,
                                                    help="only jobs with this label (repeatable: all of them)")]
    = None,
    page_size: Annotated[int, typer.Option(min=1, max=1000, help="jobs per page")] = 50,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page, not just the first")] = False,
    full: Annotated[bool, typer.Option("--full", help="with -o json: each job's whole spec (by default only its "
                                                      "parallelism, so that a page stays small)")] = False,
    output: Output = OutputFormat.table,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """List jobs, newest first."""
    states = [parse_state(s) for s in state or []]
    labels = parse_labels(label or [])
    jobs: list[job_pb2.Job] = []
    page_token = ""
    with _connect(server, token, tls_ca) as client:
        try:
            while True:
                response = client.list_jobs(states=states, labels=labels, page_size=page_size, page_token=page_token,
                                            view=js.JOB_VIEW_FULL if full else js.JOB_VIEW_BASIC)
                jobs += response.jobs
                page_token = response.next_page_token
                if not (all_pages and page_token):
                    break
        except ClientError as exc:
            fail(str(exc))
    if output is OutputFormat.json:
        print_json({"jobs": [message_json(j) for j in jobs], "next_page_token": page_token})
        return
    if not jobs:
        console.print(Text("no jobs", style="dim"))
        return
    console.print(jobs_table(jobs))
    if page_token:
        console.print(Text(f"more jobs past these {len(jobs)}: use --all or a larger --page-size", style="dim"))


@app.command()
def get(name: JobName, output: Output = OutputFormat.table, server: Server = None, token: Token = None,
        tls_ca: TlsCa = None) -> None:
    """Show one job: its state, progress, attempts and kept checkpoints (with -o json, its events too)."""
    with _connect(server, token, tls_ca) as client:
        try:
            job = client.get_job(name)
            checkpoints = client.list_checkpoints(name, page_size=GET_CHECKPOINTS).checkpoints
            events = client.job_events(name) if output is OutputFormat.json else []
        except ClientError as exc:
            fail(str(exc))
    if output is OutputFormat.json:
        print_json({**message_json(job), "checkpoints": [message_json(c) for c in checkpoints],
                    "events": [message_json(e) for e in events]})
        return
    console.print(job_details(job))
    if checkpoints:
        console.print()
        for line in checkpoints_lines(checkpoints):
            console.print(line, soft_wrap=True)


# -- cancel / logs -----------------------------------------------------------------------------------------

@app.command()
def cancel(
    name: JobName,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until the job's ranks are gone and it is "
                                                                "CANCELLED")] = True,
    timeout: CancelTimeout = 300.0,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Cancel a job: its ranks are stopped and it ends CANCELLED."""
    with _connect(server, token, tls_ca) as client:
        try:
            job = client.cancel_job(name)
            if wait and job.state not in TERMINAL:
                with errors.status(f"stopping {job.name}…"):
                    job = poll_until(job, lambda j: client.get_job(j.name), lambda j: j.state in TERMINAL,
                                     timeout, POLL_SECONDS)
        except ClientError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            errors.print(f"\nstopped waiting; the cancel of {job.name} goes on")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if job.state not in TERMINAL:
        message = "cancel requested" if not wait else f"cancel requested; still stopping after {timeout:.0f} s"
        console.print(Text.assemble((job.name, "bold"), f": {state_name(job.state)} ({message})"))
        raise typer.Exit(0 if not wait else 1)
    console.print(Text.assemble((job.name, "bold"), ": ", state_text(job.state),
                                f"  {job.state_message}" if job.state_message else ""))
    if job.state != job_pb2.JOB_STATE_CANCELLED:  # it ended on its own before the cancel took effect
        raise typer.Exit(1)


@app.command()
def logs(
    name: JobName,
    rank: Annotated[int, typer.Option(min=0, help="which rank")] = 0,
    attempt: Annotated[int, typer.Option(min=0, help="which attempt (0: the newest)")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming until the attempt ends")] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=1, metavar="N", show_default=False,
                                             help="only the last N lines (then, with --follow, what comes)")] = None,
    server: Server = None,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Print a rank's log (from the start, or its last --tail lines; with --follow, until the attempt ends)."""
    with _connect(server, token, tls_ca) as client:
        try:
            if follow:
                _wait_for_launch(client, name)
            for chunk in client.stream_logs(name, rank=rank, attempt=attempt, follow=follow, tail_lines=tail or 0):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except ClientError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:  # `roundhouse logs x | head`
            _silence_stdout()
            raise typer.Exit(0) from None


def _wait_for_launch(client: JobClient, name: str) -> None:
    """A job still queued has no log yet: with --follow, wait for its first attempt instead of failing."""
    job = client.get_job(name)
    if job.attempts or job.state in TERMINAL:
        return
    with errors.status(f"{job.name} is {state_name(job.state)}; waiting for it to launch…"):
        while not job.attempts and job.state not in TERMINAL:
            time.sleep(POLL_SECONDS)
            job = client.get_job(name)


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so that Python's exit flush does not complain."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
