"""The job status page served over HTTP: a list of jobs and a page per job that refresh themselves, a JSON
view of the same, and Prometheus metrics. (The dashboard issue grows this into the full dashboard.)"""

from __future__ import annotations

from html import escape

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from orchestrator.store import Database, Event, Job, JobState

REFRESH_SECONDS = 2
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}
.SUCCEEDED{color:#197a2b}.FAILED{color:#b3261e}.RUNNING,.LAUNCHING{color:#1a5fb4}.RESTARTING{color:#a65e00}
"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>")


def _job_summary(job: Job) -> dict:
    attempt = job.current_attempt
    return {
        "name": job.name,
        "state": job.state,
        "reason": job.state_reason,
        "message": job.state_message,
        "owner": job.owner,
        "step": job.current_step,
        "total_steps": job.total_steps,
        "loss": job.last_loss,
        "tokens_per_second": job.tokens_per_second,
        "layout": {"tp": attempt.tp, "pp": attempt.pp, "dp": attempt.dp} if attempt else None,
        "restarts": job.restart_count,
        "created": job.create_time.isoformat() + "Z",
    }


def create_app(db: Database) -> Starlette:
    def recent_jobs(limit: int = 200) -> list[Job]:
        with db.read() as session:
            return list(session.scalars(select(Job).order_by(Job.create_time.desc()).limit(limit)))

    async def jobs_page(request: Request) -> HTMLResponse:
        rows = "".join(
            f"<tr><td><a href='/jobs/{escape(j.name)}'>{escape(j.name)}</a></td>"
            f"<td class='{j.state}'>{j.state}</td><td>{j.current_step}/{j.total_steps}</td>"
            f"<td>{'' if j.last_loss is None else f'{j.last_loss:.4f}'}</td>"
            f"<td>{_layout(j)}</td><td>{j.restart_count}</td><td>{j.create_time:%Y-%m-%d %H:%M:%S}</td></tr>"
            for j in recent_jobs())
        return _page("Roundhouse jobs", "<h1>Jobs</h1><table><tr><th>Name</th><th>State</th><th>Step</th>"
                     "<th>Loss</th><th>Layout</th><th>Restarts</th><th>Created (UTC)</th></tr>"
                     f"{rows}</table>")

    async def job_page(request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        with db.read() as session:
            job = session.get(Job, name)
            if job is None:
                return HTMLResponse(f"<h1>No job {escape(name)}</h1>", status_code=404)
            events = session.scalars(select(Event).where(Event.job_name == name).order_by(Event.id)).all()
            attempts = "".join(
                f"<tr><td>{a.number}</td><td class='{a.state}'>{a.state}</td><td>{a.tp}×{a.pp}×{a.dp}</td>"
                f"<td>{a.world_size}</td><td>{a.start_step}</td><td>{escape(a.end_reason)}</td></tr>"
                for a in job.attempts)
            event_rows = "".join(
                f"<tr><td>{e.create_time:%H:%M:%S}</td><td>{escape(e.type)}</td>"
                f"<td>{e.from_state or ''} → {e.to_state or ''}</td><td>{escape(e.reason)}</td>"
                f"<td>{escape(e.message)}</td></tr>" for e in events)
            loss = "" if job.last_loss is None else f", loss {job.last_loss:.4f}"
            body = (f"<p><a href='/'>All jobs</a></p><h1>{escape(job.name)}</h1>"
                    f"<p>State: <b class='{job.state}'>{job.state}</b> {escape(job.state_message)}</p>"
                    f"<p>Step {job.current_step} of {job.total_steps}{loss}, "
                    f"{job.tokens_per_second:,.0f} tokens/s, layout {_layout(job)}</p>"
                    "<h2>Attempts</h2><table><tr><th>#</th><th>State</th><th>Layout</th><th>Ranks</th>"
                    f"<th>Start step</th><th>End</th></tr>{attempts}</table>"
                    "<h2>Events</h2><table><tr><th>Time (UTC)</th><th>Type</th><th>State</th><th>Reason</th>"
                    f"<th>Message</th></tr>{event_rows}</table>")
        return _page(f"{job.name} — Roundhouse", body)

    async def jobs_json(request: Request) -> JSONResponse:
        return JSONResponse({"jobs": [_job_summary(j) for j in recent_jobs()]})

    registry = CollectorRegistry()
    registry.register(_JobStateCollector(db))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return Response("ok")

    return Starlette(routes=[
        Route("/", jobs_page),
        Route("/jobs/{name}", job_page),
        Route("/api/jobs", jobs_json),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
    ])


def _layout(job: Job) -> str:
    attempt = job.current_attempt
    return f"{attempt.tp}×{attempt.pp}×{attempt.dp}" if attempt else "—"


class _JobStateCollector:
    """Jobs by state, read from the database at scrape time (so every replica reports the same)."""

    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        gauge = GaugeMetricFamily("roundhouse_jobs", "Jobs by state", labels=["state"])
        with self.db.read() as session:
            counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JobState:
            gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge
