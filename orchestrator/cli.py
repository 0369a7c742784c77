"""`roundhouse`: run the control plane and talk to it.

Exit codes: 0 ok; 1 the job failed or was cancelled, or the server refused; 2 bad input."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from orchestrator import config
from orchestrator.client import ClientError, JobClient, connect, describe, job_name
from orchestrator.spec import SpecError, load_spec_file, parse_spec, spec_to_proto
from roundhouse.v1 import job_pb2, job_service_pb2 as js

app = typer.Typer(help="Roundhouse: submit training jobs to the control plane and watch them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
errors = Console(stderr=True)

Server = Annotated[str | None, typer.Option("--server", envvar="ROUNDHOUSE_SERVER",
                                            help="control plane address [default: 127.0.0.1:50051]")]
Token = Annotated[str | None, typer.Option("--token", envvar="ROUNDHOUSE_TOKEN", help="API bearer token",
                                           show_default=False)]
Output = Annotated[str, typer.Option("--output", "-o", help="table or json")]
TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "blue",
               "RESTARTING": "magenta"}


def _client(server: str | None, token: str | None) -> JobClient:
    try:
        return connect(server, token)
    except ClientError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1):
    errors.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def state_name(value: int) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def parse_state(text: str) -> int:
    name = text.upper()
    name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
    try:
        return job_pb2.JobState.Value(name)
    except ValueError:
        valid = ", ".join(state_name(v) for v in job_pb2.JobState.values() if v).lower()
        raise typer.BadParameter(f"{text!r} is not a job state ({valid})") from None


def layout(job: job_pb2.Job) -> str:
    if job.attempts:
        p = job.attempts[-1].layout
    else:
        p = job.spec.parallelism
    return f"{p.tp}×{p.pp}×{p.dp}"


def age(job: job_pb2.Job) -> str:
    seconds = int(time.time() - job.create_time.ToDatetime(tzinfo=UTC).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def job_json(job: job_pb2.Job) -> dict:
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def event_line(event: job_pb2.Event) -> str:
    when = event.create_time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S")
    if event.type == "StateChanged":
        moved = f"{state_name(event.from_state) if event.from_state else '∅'} → {state_name(event.to_state)}"
    else:
        moved = event.type
    return f"{when}  {moved:<24} {event.reason}  {event.message}"


# -- serve ---------------------------------------------------------------------------------------------------

@app.command()
def serve(
    db: Annotated[str | None, typer.Option(help="database URL [default: SQLite in the home directory]")] = None,
    home: Annotated[Path | None, typer.Option(help="state directory [default: $ROUNDHOUSE_HOME or "
                                                   "~/.roundhouse]")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="gRPC port")] = config.DEFAULT_GRPC_PORT,
    http_port: Annotated[int, typer.Option(help="status page port")] = config.DEFAULT_HTTP_PORT,
    launcher: Annotated[str, typer.Option(help="where ranks run: local")] = "local",
    reconcile: Annotated[bool, typer.Option(hidden=True)] = True,
) -> None:
    """Run the control plane: gRPC API, status page and reconciler."""
    from orchestrator.server import ServerSettings, run_server

    run_server(ServerSettings(home=home or config.home_dir(), db_url=db, host=host, grpc_port=grpc_port,
                              http_port=http_port, launcher=launcher, reconcile=reconcile))


# -- submit --------------------------------------------------------------------------------------------------

@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="job spec (YAML)")],
    wait: Annotated[bool, typer.Option("--wait", help="watch the job until it ends")] = False,
    name: Annotated[str | None, typer.Option(help="override the spec's name")] = None,
    server: Server = None,
    token: Token = None,
) -> None:
    """Submit a job."""
    try:
        spec = load_spec_file(str(file))
        if name is not None:  # the same spec under another name, validated again
            spec = parse_spec({**spec.model_dump(mode="json", exclude_none=True), "name": name})
    except SpecError as exc:
        errors.print(f"[red]{file}: the job spec is invalid[/red]")
        for violation in exc.violations:
            errors.print(f"  {violation.field or '(spec)'}: {violation.description}", markup=False)
        raise typer.Exit(2) from None
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}", 2)
    client = _client(server, token)
    try:
        job = client.call("CreateJob", js.CreateJobRequest(spec=spec_to_proto(spec)))
    except ClientError as exc:
        _fail(str(exc))
    console.print(f"created [bold]{job.name}[/bold] ({spec.world_size} ranks, layout {layout(job)})")
    if wait:
        final = watch(client, job.name)
        raise typer.Exit(0 if final.state == job_pb2.JOB_STATE_SUCCEEDED else 1)


def _reconnectable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                             grpc.StatusCode.DEADLINE_EXCEEDED)


def watch(client: JobClient, name: str) -> job_pb2.Job:
    """Shows progress and events until the job ends; survives a control-plane restart."""
    last_event = 0
    final: job_pb2.Job | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("QUEUED", total=None, loss="—", speed="—")

        @retry(retry=retry_if_exception(_reconnectable), stop=stop_after_delay(60),
               wait=wait_exponential(multiplier=0.2, max=5), reraise=True)
        def follow() -> None:
            nonlocal last_event, final
            for update in client.stream("WatchJob", js.WatchJobRequest(name=name, after_event_id=last_event,
                                                                          after_step=-1)):
                for event in update.events:
                    progress.console.print(event_line(event), highlight=False, markup=False)
                    last_event = event.id
                job = update.job
                final = job
                loss = f"{job.last_loss:.4f}" if job.HasField("last_loss") else "—"
                speed = f"{job.tokens_per_second:,.0f}" if job.tokens_per_second else "—"
                progress.update(task, description=state_name(job.state), total=job.total_steps,
                                completed=job.current_step, loss=loss, speed=speed)

        try:
            follow()
        except grpc.RpcError as exc:
            _fail(describe(exc))
    if final is None:
        _fail(f"{name}: the watch ended without news")
    style = STATE_STYLE.get(state_name(final.state), "")
    console.print(f"{final.name}: [{style}]{state_name(final.state)}[/{style}] {final.state_message}")
    return final


# -- list / get ----------------------------------------------------------------------------------------------

@app.command("list")
def list_jobs(
    state: Annotated[list[str] | None, typer.Option(help="only jobs in this state (repeatable)")] = None,
    label: Annotated[list[str] | None, typer.Option(help="only jobs with this label, key=value (repeatable)")]
    = None,
    page_size: Annotated[int, typer.Option(help="jobs per page")] = 50,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    output: Output = "table",
    server: Server = None,
    token: Token = None,
) -> None:
    """List jobs, newest first."""
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: labels are key=value", param_hint="--label")
        labels[key] = value
    request = js.ListJobsRequest(page_size=page_size, states=[parse_state(s) for s in state or []], labels=labels)
    client = _client(server, token)
    jobs: list[job_pb2.Job] = []
    try:
        while True:
            response = client.call("ListJobs", request)
            jobs += response.jobs
            if not (all_pages and response.next_page_token):
                break
            request.page_token = response.next_page_token
    except ClientError as exc:
        _fail(str(exc))
    if output == "json":
        print(json.dumps({"jobs": [job_json(j) for j in jobs], "next_page_token": response.next_page_token},
                         indent=2))
        return
    table = Table("NAME", "STATE", "STEP", "LOSS", "LAYOUT", "RESTARTS", "AGE", box=None)
    for job in jobs:
        state_text = state_name(job.state)
        table.add_row(job.name.removeprefix("jobs/"), f"[{STATE_STYLE.get(state_text, '')}]{state_text}",
                      f"{job.current_step}/{job.total_steps}",
                      f"{job.last_loss:.4f}" if job.HasField("last_loss") else "—", layout(job),
                      str(job.restart_count), age(job))
    console.print(table)
    if response.next_page_token and not all_pages:
        console.print("[dim]more jobs: use --all[/dim]")


@app.command()
def get(name: Annotated[str, typer.Argument(help="job name")], output: Output = "table",
        server: Server = None, token: Token = None) -> None:
    """Show one job, its attempts and where it stands."""
    client = _client(server, token)
    try:
        job = client.call("GetJob", js.GetJobRequest(name=job_name(name)))
    except ClientError as exc:
        _fail(str(exc))
    if output == "json":
        print(json.dumps(job_json(job), indent=2))
        return
    state_text = state_name(job.state)
    console.print(f"[bold]{job.name}[/bold]  [{STATE_STYLE.get(state_text, '')}]{state_text}[/]  "
                  f"{job.state_reason}: {job.state_message}", highlight=False)
    loss = f", loss {job.last_loss:.4f}" if job.HasField("last_loss") else ""
    console.print(f"step {job.current_step}/{job.total_steps}{loss}, {job.tokens_per_second:,.0f} tokens/s, "
                  f"restarts {job.restart_count}/{job.spec.restart_policy.max_restarts}, owner {job.owner}, "
                  f"created {job.create_time.ToDatetime(tzinfo=UTC).astimezone():%Y-%m-%d %H:%M:%S}",
                  highlight=False)
    if job.spec.labels:
        console.print("labels: " + ", ".join(f"{k}={v}" for k, v in sorted(job.spec.labels.items())),
                      highlight=False)
    table = Table("ATTEMPT", "STATE", "LAYOUT", "RANKS", "START STEP", "ENDED", box=None)
    for attempt in job.attempts:
        ended = (attempt.end_time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S")
                 if attempt.HasField("end_time") else "")
        table.add_row(str(attempt.number), job_pb2.AttemptState.Name(attempt.state).removeprefix("ATTEMPT_STATE_"),
                      f"{attempt.layout.tp}×{attempt.layout.pp}×{attempt.layout.dp}", str(attempt.world_size),
                      str(attempt.start_step), f"{ended} {attempt.end_reason}".strip())
    if job.attempts:
        console.print(table)


# -- cancel / logs -------------------------------------------------------------------------------------------

@app.command()
def cancel(name: Annotated[str, typer.Argument(help="job name")],
           wait: Annotated[bool, typer.Option(help="wait until the job's ranks are gone")] = True,
           server: Server = None, token: Token = None) -> None:
    """Cancel a job: its ranks are stopped and it ends CANCELLED."""
    client = _client(server, token)
    try:
        job = client.call("CancelJob", js.CancelJobRequest(name=job_name(name)))
        deadline = time.monotonic() + 120
        while wait and job.state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.3)
            job = client.call("GetJob", js.GetJobRequest(name=job.name))
    except ClientError as exc:
        _fail(str(exc))
    console.print(f"{job.name}: {state_name(job.state)}"
                  + ("" if job.state in TERMINAL else " (cancel requested)"))


@app.command()
def logs(name: Annotated[str, typer.Argument(help="job name")],
         rank: Annotated[int, typer.Option(help="which rank")] = 0,
         attempt: Annotated[int, typer.Option(help="which attempt (0: the newest)")] = 0,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming until the attempt ends")]
         = False,
         server: Server = None, token: Token = None) -> None:
    """Print a rank's log."""
    client = _client(server, token)
    request = js.StreamLogsRequest(name=job_name(name), rank=rank, attempt=attempt, follow=follow)
    try:
        for chunk in client.stream("StreamLogs", request):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except grpc.RpcError as exc:
        _fail(describe(exc))

