"""How client commands show API messages: tables and lines for people, plain JSON for programs."""

from __future__ import annotations

import base64
import json
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group
from rich.table import Table
from rich.text import Text

from orchestrator.client import short_name
from roundhouse.v1 import job_pb2

TERMINAL = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})
STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "blue",
               "RESTARTING": "magenta", "LAUNCHING": "cyan", "QUEUED": "dim"}


# -- JSON ----------------------------------------------------------------------------------------------------

def message_json(message: Message) -> dict:
    """A message as plain JSON for scripts: every field present (null when unset), numbers as numbers
    (proto3's JSON mapping writes 64-bit integers as strings), enums by their short names ("RUNNING", not
    "JOB_STATE_RUNNING"; null when unspecified), timestamps in RFC 3339."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _field_json(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_field_json(field, item) for item in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field: FieldDescriptor, value):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == Timestamp.DESCRIPTOR.full_name:
            return value.ToJsonString() if value.seconds or value.nanos else None
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def enum_name(enum: EnumDescriptor, value: int) -> str | int | None:
    """JOB_STATE_RUNNING -> "RUNNING" (the prefix is the enum's name in upper snake case); None for 0, the
    unspecified value; the number itself for a value this client does not know."""
    if value == 0:
        return None
    known = enum.values_by_number.get(value)
    if known is None:
        return value
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return known.name.removeprefix(prefix)


def print_json(data) -> None:
    """Plain JSON on stdout: no markup, no wrapping, so that it pipes into jq."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


# -- text ----------------------------------------------------------------------------------------------------

def state_name(value: int) -> str:
    """JOB_STATE_RUNNING -> "RUNNING"."""
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


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
        # Values as the server sent them: "<redacted>" unless the caller owns the job or is an admin.
        ("env", ", ".join(f"{k}={v}" for k, v in sorted(spec.env.items())) or "—"),
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


def checkpoints_lines(checkpoints: Iterable[job_pb2.Checkpoint]) -> list[Text]:
    """The kept checkpoints, newest first: a title, a header and one line each. Not a rich Table: a table fits
    the terminal's width by cutting its widest column, the path, which must stay whole to be used."""
    headers = ("STEP", "LAYOUT", "SIZE", "ATTEMPT", "COMMITTED", "PATH")
    right = {"STEP", "SIZE"}
    rows = [(str(c.step), f"{c.layout.tp}×{c.layout.pp}×{c.layout.dp}", f"{c.size_bytes / 1e6:,.1f} MB",
             str(c.attempt), local_time(c.commit_time), c.path) for c in checkpoints]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers) - 1)]

    def line(cells: tuple[str, ...], style: str = "") -> Text:
        fixed = [cell.rjust(w) if header in right else cell.ljust(w)
                 for cell, w, header in zip(cells, widths, headers, strict=False)]
        return Text("  ".join([*fixed, cells[-1]]), style=style)

    return [Text("checkpoints (kept, newest first)", style="bold"), line(headers, "bold"), *map(line, rows)]
