"""The dashboard's defences for a shared deployment: login sessions (the cookie holds a random id, never the
token; HttpOnly, SameSite=Strict, Max-Age, Secure over TLS; expiry, logout, revocation), POSTs checked against
the public URL's origin, the security headers on every response, database calls off the event loop, and
/metrics served without reading a table per scrape."""

from __future__ import annotations

import re
import shutil
import ssl
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, insert
from starlette.testclient import TestClient
from typer.testing import CliRunner

from orchestrator.auth import UserTokens, create_token, revoke_tokens
from orchestrator.cli import app as cli_app
from orchestrator.config import DEFAULT_SESSION_TTL_SECONDS, token_file
from orchestrator.dashboard import ServiceMetrics, create_app
from orchestrator.dashboard.security import SESSION_COOKIE, origin_of, public_origin
from orchestrator.service import jobs as job_queries
from orchestrator.store import Job, utcnow
from tests.integration.test_status_page import metrics_of
from tests.support.waiting import DEADLINE

PUBLIC = "https://dash.example.com"
TEMPLATES = Path(__file__).resolve().parents[2] / "orchestrator" / "templates"


def browser(app, base_url: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False)


def session_cookie(response: httpx.Response) -> str:
    """The Set-Cookie header of the session cookie (one is expected)."""
    cookies = [c for c in response.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}=")]
    assert len(cookies) == 1, response.headers.get_list("set-cookie")
    return cookies[0]


def log_in(client: TestClient, token: str, **headers) -> httpx.Response:
    return client.post("/login", data={"token": token, "next": "/"}, headers=headers)


# -- sessions ----------------------------------------------------------------------------------------------

def test_login_starts_a_session_whose_cookie_holds_no_token(db):
    token = create_token(db, "alice", "user")
    app = create_app(db)
    with browser(app) as client:
        login = log_in(client, token)
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = session_cookie(login)
        assert token not in str(login.headers) and "roundhouse_token" not in str(login.headers)
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "max-age", "path"} <= attributes and "secure" not in attributes
        assert "samesite=strict" in cookie.lower() and f"max-age={DEFAULT_SESSION_TTL_SECONDS}" in cookie.lower()
        assert len(app.state.sessions) == 1

        assert client.get("/api/jobs").status_code == 200
        assert client.get("/").status_code == 200
        # The token itself is no cookie: one set by hand under the session's name is refused.
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, token)
        assert client.get("/api/jobs").status_code == 401


def test_an_expired_session_is_refused(db):
    token = create_token(db, "alice", "user")
    app = create_app(db, session_ttl_seconds=120)
    sessions = app.state.sessions
    with browser(app) as client:
        assert "max-age=120" in session_cookie(log_in(client, token)).lower()
        assert client.get("/api/jobs").status_code == 200
        logged_in_at = sessions.clock()
        sessions.clock = lambda: logged_in_at + 121  # the TTL has passed

        refused = client.get("/api/jobs")
        assert refused.status_code == 401 and "session" in refused.json()["error"]
        page = client.get("/jobs/anything")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/jobs/anything"
        assert len(sessions) == 0  # forgotten, not only refused


def test_logout_ends_the_session_on_the_server(db):
    token = create_token(db, "alice", "user")
    app = create_app(db)
    with browser(app) as client:
        session_id = re.match(f"{SESSION_COOKIE}=([^;]+)", session_cookie(log_in(client, token))).group(1)
        logout = client.post("/logout")
        assert logout.status_code == 303 and logout.headers["location"] == "/login"
        assert "max-age=0" in session_cookie(logout).lower()  # the browser drops it
        assert len(app.state.sessions) == 0
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, session_id)  # a copy kept elsewhere is dead too
        assert client.get("/api/jobs").status_code == 401


def test_a_revoked_token_ends_its_sessions_within_the_token_cache_time(db):
    token = create_token(db, "alice", "user")
    app = create_app(db)
    sessions = app.state.sessions
    with browser(app) as client:
        log_in(client, token)
        assert client.get("/api/jobs").status_code == 200
        revoke_tokens(db, "alice")
        logged_in_at = sessions.clock()
        sessions.clock = lambda: logged_in_at + UserTokens.CACHE_SECONDS + 1  # long before the TTL
        assert client.get("/api/jobs").status_code == 401


# -- origins -----------------------------------------------------------------------------------------------

def test_with_a_public_url_posts_must_come_from_its_origin(db):
    token = create_token(db, "alice", "user")
    app = create_app(db, public_url=PUBLIC)
    with browser(app, PUBLIC) as client:
        elsewhere = log_in(client, token, origin="https://evil.example")
        assert elsewhere.status_code == 403 and "https://evil.example" in elsewhere.json()["error"]
        no_origin = log_in(client, token)  # neither Origin nor Referer
        assert no_origin.status_code == 403 and "neither an Origin nor a Referer" in no_origin.json()["error"]
        assert log_in(client, token, referer="https://evil.example/login").status_code == 403
        assert SESSION_COOKIE not in client.cookies and len(app.state.sessions) == 0

        assert log_in(client, token, referer=f"{PUBLIC}/login?next=/").status_code == 303
        login = log_in(client, token, origin=f"{PUBLIC}:443")  # the same origin, its default port written out
        assert login.status_code == 303
        assert "; secure" in session_cookie(login).lower()  # the public URL is https
        assert len(app.state.sessions) == 1  # the second login replaced the first session

        # Cancel and logout with the session cookie: from elsewhere, or saying nothing, refused.
        cancel = client.post("/api/jobs/absent/cancel", headers={"origin": "https://evil.example"})
        assert cancel.status_code == 403 and "evil.example" in cancel.json()["error"]
        assert client.post("/api/sweeps/absent/cancel").status_code == 403
        assert client.post("/logout", headers={"origin": "http://dash.example.com"}).status_code == 403
        assert client.post("/api/jobs/absent/cancel", headers={"origin": PUBLIC}).status_code == 404  # let through
        # A bearer token is never sent by a browser on its own: no origin is asked of a script that sends one.
        assert client.post("/api/jobs/absent/cancel", headers={"authorization": f"Bearer {token}"}
                           ).status_code == 404
        assert client.post("/logout", headers={"origin": PUBLIC}).status_code == 303


def test_without_a_public_url_the_origin_is_compared_with_the_host(db):
    token = create_token(db, "alice", "user")
    with browser(create_app(db)) as client:
        assert log_in(client, token, origin="http://evil.example").status_code == 403
        assert log_in(client, token, origin="http://testserver").status_code == 303
        assert client.post("/api/jobs/absent/cancel", headers={"origin": "http://evil.example"}).status_code == 403
        assert client.post("/api/jobs/absent/cancel").status_code == 404  # no Origin: let through (weaker)


def test_the_public_url_is_checked_and_origins_compare_as_browsers_write_them():
    assert public_origin("https://Dash.Example.com/") == "https://dash.example.com"
    assert public_origin("http://10.0.0.5:8080") == "http://10.0.0.5:8080"
    assert origin_of("https://dash.example.com:443") == origin_of("https://dash.example.com")
    assert origin_of("http://[::1]:8080/x") == "http://[::1]:8080"
    assert origin_of("null") is None and origin_of("https://x:99999") is None
    for bad in ("dash.example.com", "ftp://dash.example.com", "https://dash.example.com/roundhouse",
                "https://user@dash.example.com", "https://dash.example.com/?a=1"):
        with pytest.raises(ValueError, match="--public-url"):
            public_origin(bad)

    result = CliRunner().invoke(cli_app, ["serve", "--public-url", "ftp://dash.example.com"],
                                env={"ROUNDHOUSE_PUBLIC_URL": None})
    assert result.exit_code == 2 and "--public-url" in result.output and "ftp://dash.example.com" in result.output


# -- headers -----------------------------------------------------------------------------------------------

def test_every_response_carries_the_security_headers_and_hsts_only_over_tls(db):
    token = create_token(db, "alice", "user")
    app = create_app(db)
    with browser(app) as plain, browser(app, "https://testserver") as tls:
        log_in(plain, token)
        log_in(tls, token)
        for client in (plain, tls):
            for path in ("/", "/login", "/jobs/absent", "/api/jobs", "/api/jobs/absent", "/static/dashboard.js",
                         "/static/plotly.min.js", "/metrics", "/healthz", "/no-such-route"):
                headers = client.get(path).headers
                csp = headers["content-security-policy"]
                assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
                script_src = re.search(r"script-src ([^;]*)", csp).group(1)
                assert script_src == "'self'", path  # no inline script, no eval
                assert headers["x-frame-options"] == "DENY", path
                assert headers["x-content-type-options"] == "nosniff", path
                assert headers["referrer-policy"] == "same-origin", path
                assert ("strict-transport-security" in headers) is (client is tls), path
        assert plain.post("/api/jobs/absent/cancel", headers={"origin": "https://evil.example"}
                          ).headers["x-frame-options"] == "DENY"


def test_pages_have_no_inline_script_and_name_their_subject_in_data_attributes(db):
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name  # every script is a file
        assert not re.search(r"\son[a-z]+\s*=", text), template.name  # no inline event handler
    token = create_token(db, "alice", "user")
    with browser(create_app(db)) as client:
        log_in(client, token)
        assert '<body data-page="jobs">' in client.get("/").text
        assert '<body data-page="sweeps">' in client.get("/sweeps").text
        missing = client.get("/jobs/%3Cb%3E")  # a name is escaped into its attribute
        assert missing.status_code == 404 and 'data-name="&lt;b&gt;"' in missing.text


def test_over_real_tls_the_session_cookie_is_secure_and_hsts_is_sent(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    from orchestrator.tls import ServerTls
    from tests.integration.test_tls import self_signed, serve

    cert, key = self_signed(tmp_path, "server")
    plane = serve(tmp_path / "home", ServerTls(cert, key))
    try:
        token = token_file(plane.settings.home).read_text().strip()
        verify = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=plane.dashboard_url, verify=verify, timeout=DEADLINE) as client:
            login = client.post("/login", data={"token": token, "next": "/"})
            assert login.status_code == 303 and "; secure" in session_cookie(login).lower()
            assert login.headers["strict-transport-security"].startswith("max-age=")
            assert client.get("/api/jobs").status_code == 200  # the Secure cookie comes back over https
    finally:
        plane.stop()


# -- no blocking, no scans ---------------------------------------------------------------------------------

def test_a_slow_database_call_does_not_stop_the_dashboard_answering(client, api_plane, monkeypatch):
    """A handler that waits on the database waits on a pool thread: meanwhile the event loop serves
    /healthz and other handlers."""
    entered, release = threading.Event(), threading.Event()
    list_jobs = job_queries.list_jobs

    def slow_list_jobs(*args, **kwargs):
        entered.set()
        release.wait(DEADLINE)
        return list_jobs(*args, **kwargs)

    monkeypatch.setattr(job_queries, "list_jobs", slow_list_jobs)
    base = f"http://127.0.0.1:{api_plane.http_port}"
    auth = {"Authorization": f"Bearer {client.token}"}
    slow: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: slow.append(httpx.get(f"{base}/api/jobs", headers=auth,
                                                                     timeout=DEADLINE)))
    waiting.start()
    try:
        assert entered.wait(DEADLINE)
        assert httpx.get(f"{base}/healthz", timeout=DEADLINE).text == "ok"
        assert httpx.get(f"{base}/api/sweeps", headers=auth, timeout=DEADLINE).status_code == 200
        assert not slow  # still held in the database call
    finally:
        release.set()
        waiting.join(DEADLINE)
    assert slow[0].status_code == 200


def add_jobs(db, states_and_restarts: list[tuple[str, int]]) -> None:
    now = utcnow()
    with db.session() as session:
        session.execute(insert(Job), [
            {"name": f"j-{uuid.uuid4().hex[:8]}", "uid": str(uuid.uuid4()), "spec": {}, "state": state, "owner": "m",
             "total_steps": 10, "restart_count": restarts, "hang_restart_count": 1 if restarts else 0,
             "preemption_count": 0, "create_time": now, "update_time": now} for state, restarts in states_and_restarts])


def test_metrics_are_served_from_figures_refreshed_apart_from_scrapes(db):
    metrics = ServiceMetrics(db)
    add_jobs(db, [("RUNNING", 2), ("QUEUED", 0)])
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        with browser(create_app(db, metrics=metrics)) as client:
            before = metrics_of(client.get("/metrics").text)
            assert before[("roundhouse_jobs", (("state", "RUNNING"),))] == 0  # not read yet
            assert before[("roundhouse_metrics_refreshed_timestamp_seconds", ())] == 0
            assert statements == []

            metrics.refresh()  # what the thread does every refresh_seconds: one grouped query over the jobs
            assert [s for s in statements if s.startswith("SELECT")] == [statements[-1]]
            assert "FROM jobs GROUP BY jobs.state" in statements[-1]
            read = len(statements)
            for _ in range(5):
                samples = metrics_of(client.get("/metrics").text)
            assert len(statements) == read, statements[read:]  # scrapes read no table
            assert samples[("roundhouse_jobs", (("state", "RUNNING"),))] == 1
            assert samples[("roundhouse_jobs", (("state", "QUEUED"),))] == 1
            assert samples[("roundhouse_job_restarts_total", ())] == 3  # 2 after crashes, 1 after a hang
            assert samples[("roundhouse_metrics_refreshed_timestamp_seconds", ())] > 0
    finally:
        event.remove(db.engine, "before_cursor_execute", count)


def test_the_refresh_thread_keeps_the_figures_up_to_date(db):
    metrics = ServiceMetrics(db, refresh_seconds=0.1)
    metrics.start()
    try:
        add_jobs(db, [("FAILED", 1)])
        failed = ("roundhouse_jobs", (("state", "FAILED"),))
        deadline = time.monotonic() + DEADLINE
        while (samples := metrics_of(metrics.exposition()[0].decode()))[failed] != 1:
            assert time.monotonic() < deadline, "the thread never read the new job"
            time.sleep(0.1)
        assert samples[("roundhouse_job_restarts_total", ())] == 2
    finally:
        metrics.stop()
