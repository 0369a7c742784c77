"""HTTP routes of the dashboard.

Pages are thin HTML shells (orchestrator/templates) that static/dashboard.js fills from the JSON endpoints
below and refreshes every few seconds. Charts use Plotly, whose JavaScript comes from the installed
`plotly` package and is served from here: nothing is loaded from the internet.

Auth: the same user tokens as the gRPC API, sent as `Authorization: Bearer`, or given once to the login page,
which starts a session (orchestrator/dashboard/security.py): the cookie holds the session's random id, never
the token. Everything but the login page, static files, /healthz and /metrics needs one. /metrics is open: it
carries only counts (no job names or owners) and Prometheus scrapers hold no browser cookie. Cookie-carrying
POSTs (login, logout, cancel) must come from the dashboard's own origin; every response carries a CSP that
allows no inline script, and the framing, sniffing and referrer headers.

Handlers that touch the database are plain functions, which Starlette runs on its thread pool: no database
call blocks the event loop. Queries, and who may see or cancel what, are the service layer's
(orchestrator/service/), as for the gRPC API; this module only turns them into HTTP."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, quote

import plotly
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from orchestrator import service
from orchestrator.auth import Principal, UserTokens
from orchestrator.dashboard.metrics import ServiceMetrics
from orchestrator.dashboard.security import (DEFAULT_SESSION_TTL_SECONDS, SESSION_COOKIE, SecurityHeaders, Sessions,
                                             origin_refusal, public_origin, served_securely)
from orchestrator.launcher import Launcher, LogsUnavailable
from orchestrator.launcher.logs import LogRange
from orchestrator.service import jobs as job_queries
from orchestrator.service import sweeps as sweep_queries
from orchestrator.store import Database, Job, JobState, utcnow

PACKAGE = Path(__file__).resolve().parent.parent  # orchestrator/
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
# The login form's body: a token and a path; anything bigger is not a login.
LOGIN_FORM_MAX_BYTES = 16 * 1024
LIST_PAGE_SIZE = 50
EVENTS_SHOWN = 500
METRIC_BATCH = 5000
LOG_LINES = 200
# The service layer's refusals as HTTP statuses (orchestrator/api/errors.py maps them to gRPC codes).
HTTP_STATUS = {
    service.InvalidArgument: 400,
    service.Unauthenticated: 401,
    service.PermissionDenied: 403,
    service.NotFound: 404,
    service.FailedPrecondition: 409,
    service.AlreadyExists: 409,
}


def create_app(db: Database, users: UserTokens | None = None, launcher: Launcher | None = None,
               metrics: ServiceMetrics | None = None, wake_reconciler=lambda name: None,
               wake_sweeps=lambda name: None, public_url: str | None = None,
               session_ttl_seconds: float = DEFAULT_SESSION_TTL_SECONDS) -> Starlette:
    """The dashboard's app. `public_url`: where browsers reach it (`roundhouse serve --public-url`), the only
    origin whose POSTs are accepted; None: a request's Origin is compared with its own Host. A session lasts
    `session_ttl_seconds` from login."""
    users = users or UserTokens(db)
    metrics = metrics or ServiceMetrics(db)
    public = public_origin(public_url) if public_url else None
    sessions = Sessions(db, session_ttl_seconds)
    templates = Jinja2Templates(directory=str(PACKAGE / "templates"))

    def principal_of(request: Request) -> Principal | None:
        """The bearer token's user, else the session's (the cookie). Reads the database: not for the loop."""
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            return users.lookup(header.removeprefix("Bearer ").strip())
        return sessions.principal(request.cookies.get(SESSION_COOKIE))

    def cross_origin(request: Request) -> Response | None:
        """A 403 naming the reason for a cookie-carrying POST from elsewhere (CSRF), else None. A bearer
        token is never sent by a browser on its own, so a request that carries one is not checked."""
        if "authorization" in request.headers:
            return None
        reason = origin_refusal(request, public)
        return JSONResponse({"error": reason}, status_code=403) if reason else None

    def page(template: str, request: Request, principal: Principal, status_code: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, template, {"user": principal, **context},
                                          status_code=status_code)

    def to_login(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    def unauthenticated() -> Response:
        return JSONResponse({"error": "a valid token or session is required (log in, again if your session "
                                      "expired, or send Authorization: Bearer)"}, status_code=401)

    def refused(error: service.ServiceError) -> Response:
        return JSONResponse({"error": str(error)}, status_code=HTTP_STATUS.get(type(error), 500))

    # -- login -------------------------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"next": _local_path(request.query_params.get(
            "next")), "error": ""})

    async def login(request: Request) -> Response:
        if refusal := cross_origin(request):
            return refusal
        # A plain urlencoded form: parsed here rather than adding python-multipart for two fields.
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > LOGIN_FORM_MAX_BYTES:
                return JSONResponse({"error": f"login form: larger than {LOGIN_FORM_MAX_BYTES} bytes"},
                                    status_code=413)
        form = parse_qs(body.decode("utf-8", errors="replace"))
        token = form.get("token", [""])[0].strip()
        target = _local_path(form.get("next", [""])[0])
        principal = await run_in_threadpool(users.lookup, token)  # may read the database: off the loop
        if principal is None:
            return templates.TemplateResponse(request, "login.html", {"next": target, "error": "Unknown token."},
                                              status_code=401)
        sessions.end(request.cookies.get(SESSION_COOKIE))  # a session this browser had is replaced
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, sessions.create(principal, token), max_age=int(sessions.ttl_seconds),
                            httponly=True, samesite="strict", secure=served_securely(request, public), path="/")
        return response

    def logout(request: Request) -> Response:
        if refusal := cross_origin(request):
            return refusal
        sessions.end(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=served_securely(request, public))
        return response

    # -- pages -------------------------------------------------------------------------------------------

    def jobs_page(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return to_login(request)
        return page("jobs.html", request, principal, states=[s.value for s in JobState])

    def job_page(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return to_login(request)
        name = request.path_params["name"]
        try:
            with db.read() as session:
                job_queries.get_job(session, principal, name)
        except (service.NotFound, service.InvalidArgument):
            return page("missing.html", request, principal, status_code=404, name=name)
        return page("job.html", request, principal, name=name)

    def sweeps_page(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return to_login(request)
        return page("sweeps.html", request, principal)

    def sweep_page(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return to_login(request)
        name = request.path_params["name"]
        try:
            with db.read() as session:
                sweep_queries.get_sweep(session, principal, name)
        except (service.NotFound, service.InvalidArgument):
            return page("missing.html", request, principal, status_code=404, name=name)
        return page("sweep.html", request, principal, name=name)

    # -- JSON --------------------------------------------------------------------------------------------

    def jobs_json(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        params = request.query_params
        labels = {}
        for item in params.getlist("label"):
            key, sep, value = item.partition("=")
            if not sep or not key:
                return JSONResponse({"error": f"label: {item!r} is not key=value"}, status_code=400)
            labels[key.strip()] = value.strip()
        try:
            page_size = min(max(int(params.get("page_size") or LIST_PAGE_SIZE), 1), job_queries.MAX_PAGE_SIZE)
        except ValueError:
            return JSONResponse({"error": "page_size: not a number"}, status_code=400)
        try:
            with db.read() as session:
                listed = job_queries.list_jobs(session, principal, [s for s in params.getlist("state") if s], labels,
                                               page_size, params.get("page_token", ""))
                now = utcnow()
                return JSONResponse({"jobs": [_job_summary(j, now) for j in listed.items],
                                     "next_page_token": listed.next_page_token})
        except service.ServiceError as error:
            return refused(error)

    def job_json(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        try:
            after_metric = int(request.query_params.get("after_metric") or 0)
        except ValueError:
            return JSONResponse({"error": "after_metric: not a number"}, status_code=400)
        try:
            with db.read() as session:
                job = job_queries.get_job(session, principal, request.path_params["name"])
                return JSONResponse(_job_detail(session, job, principal, after_metric, utcnow()))
        except service.ServiceError as error:
            return refused(error)

    def job_log(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        try:
            rank = int(request.query_params.get("rank", "0"))
            lines = min(max(int(request.query_params.get("lines") or LOG_LINES), 1), 5000)
        except ValueError:
            return PlainTextResponse("rank and lines must be numbers", status_code=400)
        try:
            with db.read() as session:
                ref = job_queries.log_source(session, principal, request.path_params["name"], rank)
        except service.ServiceError as error:
            return PlainTextResponse(str(error), status_code=HTTP_STATUS.get(type(error), 500))
        if launcher is None:
            return PlainTextResponse("no launcher to read logs from", status_code=404)
        try:
            reads = launcher.logs(ref, rank, False, lambda: True, LogRange(tail_lines=lines))  # seeks to the tail
            text = b"".join(read.data for read in reads).decode("utf-8", errors="replace")
        except LogsUnavailable as exc:
            return PlainTextResponse(str(exc), status_code=503)
        return PlainTextResponse("\n".join(text.splitlines()[-lines:]))

    def cancel(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        # CSRF: the cookie is SameSite=Strict, and a cookie-authenticated POST must come from this origin.
        if refusal := cross_origin(request):
            return refusal
        try:
            with db.session() as session:
                name = job_queries.cancel_job(session, principal, request.path_params["name"]).name
        except service.ServiceError as error:
            return refused(error)
        wake_reconciler(name)
        return JSONResponse({"cancel_requested": True})

    def sweeps_json(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        try:
            with db.read() as session:
                listed = sweep_queries.list_sweeps(session, principal, LIST_PAGE_SIZE,
                                                   request.query_params.get("page_token", ""))
                return JSONResponse({"sweeps": [_sweep_summary(sweep_queries.sweep_view(session, s))
                                                for s in listed.items],
                                     "next_page_token": listed.next_page_token})
        except service.ServiceError as error:
            return refused(error)

    def sweep_json(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        try:
            with db.read() as session:
                sweep = sweep_queries.get_sweep(session, principal, request.path_params["name"])
                return JSONResponse(_sweep_detail(sweep_queries.sweep_view(session, sweep), principal))
        except service.ServiceError as error:
            return refused(error)

    def cancel_sweep(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return unauthenticated()
        if refusal := cross_origin(request):
            return refusal
        try:
            with db.session() as session:
                name = sweep_queries.cancel_sweep(session, principal, request.path_params["name"]).name
        except service.ServiceError as error:
            return refused(error)
        wake_sweeps(name)
        return JSONResponse({"cancel_requested": True})

    # -- service -----------------------------------------------------------------------------------------

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def plotly_js(request: Request) -> Response:
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    async def healthz(request: Request) -> Response:
        return Response("ok")

    app = Starlette(middleware=[Middleware(SecurityHeaders)], routes=[
        Route("/", jobs_page),
        Route("/jobs/{name}", job_page),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/jobs", jobs_json),
        Route("/api/jobs/{name}", job_json),
        Route("/api/jobs/{name}/log", job_log),
        Route("/api/jobs/{name}/cancel", cancel, methods=["POST"]),
        Route("/sweeps", sweeps_page),
        Route("/sweeps/{name}", sweep_page),
        Route("/api/sweeps", sweeps_json),
        Route("/api/sweeps/{name}", sweep_json),
        Route("/api/sweeps/{name}/cancel", cancel_sweep, methods=["POST"]),
        Route("/metrics", prometheus),
        Route("/healthz", healthz),
        Route("/static/plotly.min.js", plotly_js),
        Mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static"),
    ])
    app.state.sessions = sessions  # for tests: expire one by its clock, count them
    return app


def _job_detail(session, job: Job, principal: Principal, after_metric: int, now: datetime) -> dict:
    """What the job page shows: the job, its attempts, checkpoints, newest events, the current attempt's
    ranks, and its metric points after the cursor `after_metric`."""
    attempt = job.current_attempt
    return {
        "job": _job_summary(job, now),
        "can_cancel": job_queries.may_cancel(principal, job),
        "attempts": [{"number": a.number, "state": a.state, "layout": _layout(a), "world_size": a.world_size,
                      "start_step": a.start_step, "start_time": _time(a.start_time or a.create_time),
                      "end_time": _time(a.end_time), "end_reason": a.end_reason} for a in job.attempts],
        "checkpoints": [{"step": c.step, "attempt": c.attempt, "layout": f"{c.tp}×{c.pp}×{c.dp}",
                         "size_bytes": c.size_bytes, "commit_time": _time(c.commit_time)}
                        for c in job_queries.checkpoints_of(session, job)],
        "events": [{"id": e.id, "time": _time(e.create_time), "type": e.type, "attempt": e.attempt,
                    "from_state": e.from_state, "to_state": e.to_state, "reason": e.reason, "message": e.message}
                   for e in job_queries.newest_events(session, job, EVENTS_SHOWN)],
        "ranks": [{"rank": r.rank, "attempt": r.attempt, "step": r.step, "phase": r.phase,
                   "heartbeat_age_seconds": round((now - r.last_heartbeat).total_seconds(), 1)}
                  for r in job_queries.ranks_of(session, job)],
        "world_size": attempt.world_size if attempt else 0,
        "metrics": [_metric(m) for m in job_queries.metrics_after(session, job, after_metric, METRIC_BATCH)],
        "metric_batch": METRIC_BATCH,  # a full batch: more points follow (ask again after the last id)
    }


def _metric(m) -> dict:
    """A metric point for the job page's curves; `sigma_max` (µP's top singular values by parameter name, null
    where not finite) only on the steps that carry it."""
    point = {"id": m.id, "attempt": m.attempt, "step": m.step, "loss": m.loss, "val_loss": m.val_loss,
             "tokens_per_second": m.tokens_per_second, "memory_bytes": m.memory_bytes}
    if m.sigma_max:
        point["sigma_max"] = m.sigma_max
    return point


def _job_summary(job: Job, now: datetime) -> dict:
    attempt = job.current_attempt
    return {
        "name": job.name,
        "state": job.state,
        "reason": job.state_reason,
        "message": job.state_message,
        "owner": job.owner,
        "labels": {label.key: label.value for label in job.labels},
        "layout": _layout(attempt) if attempt else "",
        "world_size": attempt.world_size if attempt else 0,
        "step": job.current_step,
        "total_steps": job.total_steps,
        "loss": job.last_loss,
        "tokens_per_second": job.tokens_per_second,
        "eta_seconds": _eta_seconds(job),
        "restarts": job.restart_count + job.hang_restart_count + job.preemption_count,
        "cancel_requested": job.cancel_requested,
        "created": _time(job.create_time),
        "age_seconds": round((now - job.create_time).total_seconds()),
    }


def _sweep_summary(view: sweep_queries.SweepView) -> dict:
    sweep = view.sweep
    return {
        "name": sweep.name,
        "state": sweep.state,
        "reason": sweep.state_reason,
        "message": sweep.state_message,
        "owner": sweep.owner,
        "cancel_requested": sweep.cancel_requested,
        "warnings": list(sweep.warnings or []),
        "created": _time(sweep.create_time),
        "trials": len(view.trials),
        "trials_ended": sum(1 for t in view.trials if t.objective is not None),
        "best_learning_rate": sweep.best["learning_rate"] if sweep.best else None,
        "target": view.target.name if view.target is not None else None,
        "target_state": view.target.state if view.target is not None else None,
    }


def _sweep_detail(view: sweep_queries.SweepView, principal: Principal) -> dict:
    """What the sweep page shows: the sweep, its trials (objective null while running; `infinite` when it
    failed or has no finite validation loss), the chosen point, the target and the tuning cost."""
    best = view.sweep.best
    return {
        "sweep": _sweep_summary(view),
        "can_cancel": sweep_queries.may_cancel(principal, view.sweep),
        "proxy_width": view.spec.proxy.model.hidden_size,
        "target_width": view.spec.target.model.hidden_size,
        "eval_windows": view.spec.eval_windows,
        "max_parallel": view.spec.max_parallel,
        "trials": [{"job": t.job_name, "index": t.plan.index, "learning_rate": t.plan.point.learning_rate,
                    "weight_decay": t.plan.point.weight_decay, "seed": t.plan.seed,
                    "hyperparameters": dict(t.plan.point.hyperparameters),
                    "state": t.job.state if t.job is not None else None,
                    "step": t.job.current_step if t.job is not None else 0,
                    "total_steps": view.spec.proxy.training.steps,
                    "objective": t.objective if t.objective is not None and math.isfinite(t.objective) else None,
                    "infinite": t.objective is not None and not math.isfinite(t.objective),
                    "wall_seconds": round(t.wall_seconds, 1)} for t in view.trials],
        "best": None if not best else {
            "job": view.spec.trial_job_name(best["trial"]), "learning_rate": best["learning_rate"],
            "weight_decay": best["weight_decay"], "hyperparameters": best.get("hyperparameters", {}),
            "objective": best["objective"]},
        "target": None if view.target is None else {
            "name": view.target.name, "state": view.target.state, "step": view.target.current_step,
            "total_steps": view.target.total_steps, "loss": view.target.last_loss},
        "tuning": {"flops_ratio": view.tuning_flops_ratio, "wall_seconds": round(view.tuning_wall_seconds, 1)},
    }


def _eta_seconds(job: Job) -> float | None:
    """Steps left × tokens per step ÷ tokens/s (the newest rate rank 0 reported)."""
    if JobState(job.state).terminal or job.tokens_per_second <= 0:
        return None
    training, model = job.spec.get("training", {}), job.spec.get("model", {})
    tokens_per_step = training.get("global_batch_size", 8) * model.get("seq_length", 64)
    return round((job.total_steps - job.current_step) * tokens_per_step / job.tokens_per_second, 1)


def _layout(attempt) -> str:
    return f"{attempt.tp}×{attempt.pp}×{attempt.dp}"


def _time(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


def _local_path(target: str | None) -> str:
    """Only a path on this server: never redirect a login to another site."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"
