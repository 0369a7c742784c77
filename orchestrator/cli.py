"""`roundhouse`: run the control plane and talk to it.

Exit codes: 0 ok; 1 the job failed or was cancelled, or the server refused or could not be reached; 2 bad
input (an invalid spec, an unknown state, a malformed label)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from datetime import UTC
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from orchestrator import config
from orchestrator.client import ClientError, JobClient, connect, short_name
from contract.spec import SpecError, load_spec_file, parse_spec, spec_to_proto
from roundhouse.v1 import job_pb2

app = typer.Typer(help="Roundhouse: run the control plane, submit training jobs to it and watch them.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
console = Console(highlight=False)
# Messages and event lines are not wrapped at the terminal width: a log or a pipe gets them whole.
errors = Console(stderr=True, highlight=False, soft_wrap=True)

# `roundhouse get` shows this many of the newest checkpoints (retention usually keeps fewer).
GET_CHECKPOINTS = 20
TERMINAL = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})
STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "blue",
               "RESTARTING": "magenta", "LAUNCHING": "cyan", "QUEUED": "dim"}
# How long `submit --wait` keeps trying to reach a control plane that went away (restarted, say).
RECONNECT_SECONDS = 60.0
POLL_SECONDS = 0.5
EXIT_INTERRUPTED = 130


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class LauncherKind(str, Enum):
    local = "local"
    kubernetes = "kubernetes"


Server = Annotated[str | None, typer.Option("--server", envvar="ROUNDHOUSE_SERVER", show_default=False, metavar="HOST:PORT",
                                            help=f"control plane address [default: {config.DEFAULT_SERVER}]")]
Token = Annotated[str | None, typer.Option("--token", envvar="ROUNDHOUSE_TOKEN", show_default=False, metavar="TOKEN",
                                           help="API bearer token [default: the admin token of a local server]")]
Output = Annotated[OutputFormat, typer.Option("--output", "-o", case_sensitive=False, help="table or json")]
JobName = Annotated[str, typer.Argument(help="job name: NAME or jobs/NAME", metavar="NAME", show_default=False)]


# -- shared helpers ----------------------------------------------------------------------------------------

def _fail(message: str, code: int = 1) -> NoReturn:
    errors.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


def _connect(server: str | None, token: str | None) -> JobClient:
    try:
        return connect(server, token)
    except ClientError as exc:
        _fail(str(exc))


def state_name(value: int) -> str:
    """JOB_STATE_RUNNING -> "RUNNING"."""
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


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


def state_text(value: int) -> Text:
    name = state_name(value)
    return Text(name, style=STATE_STYLE.get(name, ""))


def layout(job: job_pb2.Job) -> str:
    """tp×pp×dp of the newest attempt, else of the spec."""
    p = job.attempts[-1].layout if job.attempts else job.spec.parallelism
    return f"{p.tp or 1}×{p.pp or 1}×{p.dp or 1}"


def loss_text(job: job_pb2.Job) -> str:
    return f"{job.last_loss:.4f}" if job.HasField("last_loss") else "—"


def speed_text(tokens_per_second: float) -> str:
    return f"{tokens_per_second:,.0f}" if tokens_per_second else "—"


def local_time(ts: Timestamp, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return ts.ToDatetime(tzinfo=UTC).astimezone().strftime(fmt) if ts.seconds or ts.nanos else "—"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def age(job: job_pb2.Job, now: float | None = None) -> str:
    if not job.HasField("create_time"):
        return "—"
    return duration((now or time.time()) - job.create_time.ToDatetime(tzinfo=UTC).timestamp())


def job_json(job: job_pb2.Job) -> dict:
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def print_json(data) -> None:
    """Plain JSON on stdout: no markup, no wrapping, so that it pipes into jq."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def event_line(event: job_pb2.Event) -> Text:
    """`time  type  from → to  reason  message`, one line per event."""
    moved = ""
    if event.to_state:
        before = state_name(event.from_state) if event.from_state else "—"
        moved = f"{before} → {state_name(event.to_state)}"
    line = Text.assemble((local_time(event.create_time, "%H:%M:%S"), "dim"), "  ", (f"{event.type:<16}", "bold"),
                         " ", f"{moved:<25}", " ", (event.reason, "cyan"))
    if event.message:
        line.append(f"  {event.message}")
    return line


def jobs_table(jobs: Iterable[job_pb2.Job]) -> Table:
    table = Table(box=None, pad_edge=False)
    for header in ("NAME", "STATE", "STEP/TOTAL", "LOSS", "LAYOUT", "RESTARTS", "AGE"):
        table.add_column(header, no_wrap=True, justify="right" if header in ("LOSS", "RESTARTS", "AGE") else "left")
    now = time.time()
    for job in jobs:
        table.add_row(short_name(job.name), state_text(job.state), f"{job.current_step}/{job.total_steps}",
                      loss_text(job), layout(job), str(job.restart_count), age(job, now))
    return table


def _ran_for(attempt: job_pb2.Attempt) -> str:
    if not attempt.HasField("create_time"):
        return "—"
    end = attempt.end_time.ToDatetime(tzinfo=UTC).timestamp() if attempt.HasField("end_time") else time.time()
    return duration(end - attempt.create_time.ToDatetime(tzinfo=UTC).timestamp())


def job_details(job: job_pb2.Job) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    status = state_text(job.state)
    if job.state_reason:
        status.append(f"  {job.state_reason}", style="cyan")
    if job.state_message:
        status.append(f": {job.state_message}")
    if job.cancel_requested and job.state not in TERMINAL:
        status.append("  (cancel requested)", style="yellow")
    spec = job.spec
    rows = [
        ("name", Text(job.name)),
        ("state", status),
        ("step", f"{job.current_step}/{job.total_steps}"),
        ("loss", loss_text(job)),
        ("tokens/s", speed_text(job.tokens_per_second)),
        ("layout", f"{layout(job)} (tp×pp×dp), {spec.resources.ranks or 1} ranks"),
        ("model", (f"{spec.model.layers} layers, hidden {spec.model.hidden_size}, {spec.model.heads} heads, "
                   f"seq {spec.model.seq_length}, vocab {spec.model.vocab_size}")),
        ("restarts", (f"{job.restart_count}/{spec.restart_policy.max_restarts} after crashes, "
                      f"{job.hang_restart_count}/{spec.restart_policy.max_hang_restarts} after hangs, "
                      f"{job.preemption_count}/{spec.restart_policy.max_preemptions} preemptions")),
        ("checkpoint", f"step {job.checkpoint_step}" if job.checkpoint_step else "none committed"),
        ("owner", job.owner or "—"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items())) or "—"),
        ("created", local_time(job.create_time)),
        ("started", local_time(job.start_time)),
        ("ended", local_time(job.end_time)),
        ("uid", job.uid),
    ]
    for key, value in rows:
        facts.add_row(key, value if isinstance(value, Text) else Text(value))
    if not job.attempts:
        return Group(facts, Text("\nno attempts yet", style="dim"))
    attempts = Table(box=None, pad_edge=False, title="attempts", title_justify="left", title_style="bold")
    for header in ("#", "STATE", "LAYOUT", "WORLD SIZE", "START STEP", "RAN FOR", "END REASON"):
        attempts.add_column(header, no_wrap=header != "END REASON")
    for a in job.attempts:
        attempt_state = job_pb2.AttemptState.Name(a.state).removeprefix("ATTEMPT_STATE_")
        attempts.add_row(str(a.number), Text(attempt_state, style=STATE_STYLE.get(attempt_state, "")),
                         f"{a.layout.tp}×{a.layout.pp}×{a.layout.dp}", str(a.world_size), str(a.start_step),
                         _ran_for(a), Text(a.end_reason or "—"))
    return Group(facts, Text(""), attempts)


def checkpoints_table(checkpoints: Iterable[job_pb2.Checkpoint]) -> Table:
    table = Table(box=None, pad_edge=False, title="checkpoints (kept, newest first)", title_justify="left",
                  title_style="bold")
    for header in ("STEP", "LAYOUT", "SIZE", "ATTEMPT", "COMMITTED", "PATH"):
        table.add_column(header, no_wrap=header != "PATH", justify="right" if header in ("STEP", "SIZE") else "left")
    for c in checkpoints:
        table.add_row(str(c.step), f"{c.layout.tp}×{c.layout.pp}×{c.layout.dp}", f"{c.size_bytes / 1e6:,.1f} MB",
                      str(c.attempt), local_time(c.commit_time), c.path)
    return table


# -- serve -------------------------------------------------------------------------------------------------

@app.command()
def serve(
    db: Annotated[str | None, typer.Option(metavar="URL", show_default=False,
                                           help="database URL, e.g. postgresql+psycopg://user@host/db "
                                                "[default: SQLite in the home directory]")] = None,
    home: Annotated[Path | None, typer.Option(metavar="DIR", show_default=False,
                                              help="state directory: database, admin token, runs' logs "
                                                   "[default: $ROUNDHOUSE_HOME or ~/.roundhouse]")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(min=0, max=65535, help="gRPC API port (0: any free port)")]
    = config.DEFAULT_GRPC_PORT,
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="status page port (0: any free port)")]
    = config.DEFAULT_HTTP_PORT,
    launcher: Annotated[LauncherKind, typer.Option(help="where ranks run")] = LauncherKind.local,
    max_ranks: Annotated[int | None, typer.Option(min=1, metavar="N", show_default=False,
                                                  help="the most ranks to run at once; a job asking for more "
                                                       "runs reshaped to a smaller valid layout "
                                                       "[default: no limit]")] = None,
    namespace: Annotated[str, typer.Option(envvar="ROUNDHOUSE_NAMESPACE", rich_help_panel="Kubernetes",
                                           help="namespace of the jobs' pods")] = "default",
    kubeconfig: Annotated[str | None, typer.Option(metavar="FILE", show_default=False, rich_help_panel="Kubernetes",
                                                   help="kubeconfig [default: in-cluster config inside a pod, "
                                                        "else ~/.kube/config]")] = None,
    image: Annotated[str, typer.Option(envvar="ROUNDHOUSE_TRAINER_IMAGE", rich_help_panel="Kubernetes",
                                       help="trainer image (a job's kubernetes.image overrides it)")]
    = "roundhouse/trainer:0.1.0",
    volume_claim: Annotated[str | None, typer.Option(envvar="ROUNDHOUSE_VOLUME_CLAIM", show_default=False,
                                                     rich_help_panel="Kubernetes",
                                                     help="PersistentVolumeClaim (ReadWriteMany) for data and "
                                                          "checkpoints [default: an emptyDir, for trials]")] = None,
    unschedulable_timeout: Annotated[float, typer.Option(metavar="SECONDS", rich_help_panel="Kubernetes",
                                                         help="fail an attempt whose pod stays unschedulable "
                                                              "this long")] = 300.0,
    advertise_address: Annotated[str | None, typer.Option(envvar="ROUNDHOUSE_ADVERTISE_ADDRESS", show_default=False,
                                                          metavar="HOST:PORT",
                                                          help="how ranks reach this server [default: "
                                                               "HOST:GRPC_PORT]")] = None,
    reconcile: Annotated[bool, typer.Option("--reconcile/--no-reconcile", hidden=True,
                                            help="run the reconciler (off: jobs are recorded, never launched)")]
    = True,
) -> None:
    """Run the control plane: gRPC API, status page and reconciler, until Ctrl-C."""
    from sqlalchemy.exc import SQLAlchemyError

    from orchestrator.server import ServerSettings, run_server

    settings = ServerSettings(home=(home or config.home_dir()).expanduser(), db_url=db, host=host,
                              grpc_port=grpc_port, http_port=http_port, launcher=launcher.value, max_ranks=max_ranks,
                              reconcile=reconcile, kubeconfig=kubeconfig, advertise_address=advertise_address)
    if launcher is LauncherKind.kubernetes:
        from k8s.launcher import KubernetesSettings
        from k8s.manifests import PodSettings

        settings.kubernetes = KubernetesSettings(
            pods=PodSettings(namespace=namespace, image=image, volume_claim=volume_claim),
            unschedulable_timeout_seconds=unschedulable_timeout)
    try:
        run_server(settings)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        _fail(f"cannot start the control plane: {exc}")


# -- submit ------------------------------------------------------------------------------------------------

@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="job spec (YAML)", metavar="FILE", show_default=False)],
    wait: Annotated[bool, typer.Option("--wait", help="show progress and events until the job ends; exit 0 "
                                                      "only if it SUCCEEDED")] = False,
    name: Annotated[str | None, typer.Option(help="submit under this name instead of the spec's",
                                             show_default=False)] = None,
    server: Server = None,
    token: Token = None,
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
        _fail(f"cannot read {file}: {exc.strerror or exc}", 2)
    with _connect(server, token) as client:
        try:
            job = client.create_job(spec_to_proto(spec))
        except ClientError as exc:
            _fail(str(exc))
        console.print(Text.assemble((job.name, "bold"), f" created ({spec.world_size} ranks, layout {layout(job)}, "
                                                         f"{spec.training.steps} steps)"))
        if not wait:
            return
        try:
            final = watch(client, job.name)
        except KeyboardInterrupt:
            errors.print(f"\nstopped watching; {job.name} keeps running "
                         f"(`roundhouse cancel {short_name(job.name)}` stops it)")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(0 if final.state == job_pb2.JOB_STATE_SUCCEEDED else 1)


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
            _fail(str(exc) if job is None else f"{exc}\n(gave up watching {name}; `roundhouse get "
                                                f"{short_name(name)}` shows where it stands)")
        except _StreamEnded as exc:
            _fail(f"{exc}; gave up after {RECONNECT_SECONDS:.0f} s")
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
    output: Output = OutputFormat.table,
    server: Server = None,
    token: Token = None,
) -> None:
    """List jobs, newest first."""
    states = [parse_state(s) for s in state or []]
    labels = parse_labels(label or [])
    jobs: list[job_pb2.Job] = []
    page_token = ""
    with _connect(server, token) as client:
        try:
            while True:
                response = client.list_jobs(states=states, labels=labels, page_size=page_size, page_token=page_token)
                jobs += response.jobs
                page_token = response.next_page_token
                if not (all_pages and page_token):
                    break
        except ClientError as exc:
            _fail(str(exc))
    if output is OutputFormat.json:
        print_json({"jobs": [job_json(j) for j in jobs], "next_page_token": page_token})
        return
    if not jobs:
        console.print(Text("no jobs", style="dim"))
        return
    console.print(jobs_table(jobs))
    if page_token:
        console.print(Text(f"more jobs past these {len(jobs)}: use --all or a larger --page-size", style="dim"))


@app.command()
def get(name: JobName, output: Output = OutputFormat.table, server: Server = None, token: Token = None) -> None:
    """Show one job: its state, progress and attempts."""
    with _connect(server, token) as client:
        try:
            job = client.get_job(name)
            checkpoints = client.list_checkpoints(name, page_size=GET_CHECKPOINTS).checkpoints
        except ClientError as exc:
            _fail(str(exc))
    if output is OutputFormat.json:
        print_json({**job_json(job), "checkpoints": [job_json(c) for c in checkpoints]})
        return
    console.print(job_details(job))
    if checkpoints:
        console.print(Text(""), checkpoints_table(checkpoints))


# -- cancel / logs -----------------------------------------------------------------------------------------

@app.command()
def cancel(
    name: JobName,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until the job's ranks are gone and it is "
                                                                "CANCELLED")] = True,
    timeout: Annotated[float, typer.Option(min=0, help="give up waiting after this many seconds (0: never)")]
    = 300.0,
    server: Server = None,
    token: Token = None,
) -> None:
    """Cancel a job: its ranks are stopped and it ends CANCELLED."""
    with _connect(server, token) as client:
        try:
            job = client.cancel_job(name)
            if wait and job.state not in TERMINAL:
                deadline = time.monotonic() + timeout if timeout else float("inf")
                with errors.status(f"stopping {job.name}…"):
                    while job.state not in TERMINAL and time.monotonic() < deadline:
                        time.sleep(POLL_SECONDS)
                        job = client.get_job(job.name)
        except ClientError as exc:
            _fail(str(exc))
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
    server: Server = None,
    token: Token = None,
) -> None:
    """Print a rank's log (from the start; with --follow, until the attempt ends)."""
    with _connect(server, token) as client:
        try:
            if follow:
                _wait_for_launch(client, name)
            for chunk in client.stream_logs(name, rank=rank, attempt=attempt, follow=follow):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except ClientError as exc:
            _fail(str(exc))
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


# -- token -------------------------------------------------------------------------------------------------

token_app = typer.Typer(help="Manage users' API tokens, on the control plane's database (run it where the "
                             "server runs, e.g. kubectl exec).", no_args_is_help=True)
app.add_typer(token_app, name="token")

TokenDb = Annotated[str | None, typer.Option("--db", metavar="URL", show_default=False,
                                             help="the control plane's database URL [default: SQLite in the "
                                                  "home directory]")]
TokenHome = Annotated[Path | None, typer.Option(metavar="DIR", show_default=False,
                                                help="the control plane's state directory [default: "
                                                     "$ROUNDHOUSE_HOME or ~/.roundhouse]")]


def _token_database(db: str | None, home: Path | None):
    from orchestrator.store import Database, migrate

    if db is None:
        home = (home or config.home_dir()).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        db = config.default_db_url(home)
    database = Database(db)
    migrate(database)
    return database


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="who the token is for: jobs they submit are theirs")],
    role: Annotated[str, typer.Option(help="admin (may cancel any job) or user (its own)")] = "user",
    db: TokenDb = None,
    home: TokenHome = None,
) -> None:
    """Create a token and print it (only its digest is stored: this is the one time it is shown)."""
    from orchestrator.auth import create_token

    database = _token_database(db, home)
    try:
        token = create_token(database, user, role)
    except ValueError as exc:
        _fail(str(exc), 2)
    finally:
        database.dispose()
    print(token)
    errors.print(f"created a {role} token for {user}; use it as ROUNDHOUSE_TOKEN or --token, or to log in to "
                 "the dashboard")


@token_app.command("list")
def token_list(db: TokenDb = None, home: TokenHome = None) -> None:
    """Every user with a token, their role and how many tokens they have."""
    from orchestrator.auth import list_tokens

    database = _token_database(db, home)
    try:
        rows = list_tokens(database)
    finally:
        database.dispose()
    table = Table(box=None, pad_edge=False)
    for header in ("USER", "ROLE", "TOKENS"):
        table.add_column(header)
    for user, role, count in rows:
        table.add_row(user, role, str(count))
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    user: Annotated[str, typer.Option(help="whose tokens to delete (all of them)")],
    db: TokenDb = None,
    home: TokenHome = None,
) -> None:
    """Delete every token of a user; servers stop accepting them within seconds."""
    from orchestrator.auth import revoke_tokens

    database = _token_database(db, home)
    try:
        count = revoke_tokens(database, user)
    finally:
        database.dispose()
    if count == 0:
        _fail(f"{user} has no token", 1)
    console.print(f"revoked {count} token(s) of {user}")


# -- data --------------------------------------------------------------------------------------------------

data_app = typer.Typer(help="Prepare training data: tokenise text into a memory-mapped dataset.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[list[Path], typer.Argument(help="text files, or directories read recursively",
                                                 metavar="INPUT", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="dataset prefix: writes PREFIX.bin and "
                                                                  "PREFIX.idx", metavar="PREFIX",
                                                    show_default=False)],
    tokenizer: Annotated[str, typer.Option(help="bytes (vocab 256), bytes+eod (vocab 257), or the path of a "
                                                "Hugging Face tokenizer.json")] = "bytes",
) -> None:
    """Tokenise text files into a dataset the trainer reads (set data.path to PREFIX.idx)."""
    from trainers.data import DataError
    from trainers.prepare import prepare
    from trainers.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer)
    except TokenizerError as exc:
        _fail(str(exc), 2)
    try:
        report = prepare(inputs, output, tok)
    except DataError as exc:
        _fail(str(exc), 2)
    except (OSError, ValueError) as exc:
        _fail(f"cannot prepare {output}: {exc}")
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in (
        ("dataset", f"{report.index_path} + {report.data_path.name}"),
        ("tokenizer", f"{report.tokenizer} (vocab {report.vocab_size:,}, {report.dtype})"),
        ("files", f"{report.files:,}"),
        ("documents", f"{report.documents:,}"),
        ("tokens", f"{report.tokens:,}"),
        ("bytes read", f"{report.bytes_read:,}"),
        ("skipped", f"{report.skipped_undecodable:,} not UTF-8 text, {report.skipped_empty:,} empty"),
        ("time", f"{report.seconds:.2f} s ({report.tokens_per_second:,.0f} tokens/s)"),
    ):
        table.add_row(key, value)
    console.print(table)
    for path in report.skipped_examples:
        console.print(f"[dim]skipped {escape(str(path))}[/dim]")


if __name__ == "__main__":
    app()
