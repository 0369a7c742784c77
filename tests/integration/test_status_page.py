"""The dashboard over plain HTTP (no browser): auth, the JSON it serves, keyset pages over thousands of jobs,
cancel's permission rule and CSRF defence, and Prometheus metrics."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, insert

from orchestrator.auth import digest, new_token
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import ApiToken, Job, JobLabel, Metric, utcnow
from roundhouse.v1 import job_service_pb2 as js
from tests.support.waiting import DEADLINE


def create(client, name: str, labels: dict | None = None) -> None:
    spec = spec_to_proto(parse_spec({"name": name, "labels": labels or {}, "parallelism": {"dp": 2},
                                     "training": {"global_batch_size": 8, "micro_batch_size": 4}}))
    client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=client.metadata)


def add_user(plane, user: str, role: str) -> str:
    token = new_token()
    with plane.db.session() as session:
        session.add(ApiToken(user=user, role=role, token_hash=digest(token)))
    return token


def metrics_of(text: str) -> dict:
    """{(sample name, labels as a sorted tuple): value} from the exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_pages_and_json_need_a_token(client, api_plane):
    create(client, "shown")
    base = f"http://127.0.0.1:{api_plane.http_port}"
    for path in ("/", "/jobs/shown"):
        response = httpx.get(base + path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
    for path in ("/api/jobs", "/api/jobs/shown", "/api/jobs/shown/log"):
        assert httpx.get(base + path).status_code == 401
    assert httpx.get(base + "/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(base + "/api/jobs/shown/cancel").status_code == 401
    assert httpx.get(base + "/login").status_code == 200
    assert httpx.get(base + "/static/dashboard.js").status_code == 200
    plotly = httpx.get(base + "/static/plotly.min.js")  # served from the installed plotly package
    assert plotly.status_code == 200 and len(plotly.content) > 1_000_000

    refused = httpx.post(base + "/login", data={"token": "wrong", "next": "/"})
    assert refused.status_code == 401 and "roundhouse_session" not in refused.headers.get("set-cookie", "")
    login = httpx.post(base + "/login", data={"token": client.token, "next": "/jobs/shown"})
    assert login.status_code == 303 and login.headers["location"] == "/jobs/shown"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    # Never redirected to another site after logging in.
    assert httpx.post(base + "/login", data={"token": client.token, "next": "//evil.example/"}
                      ).headers["location"] == "/"

    with httpx.Client(base_url=base, cookies=login.cookies) as browser:
        assert browser.get("/").status_code == 200
        page = browser.get("/jobs/shown")
        assert page.status_code == 200 and "<h1 id=\"job-name\">shown</h1>" in page.text
        assert browser.get("/jobs/missing").status_code == 404
        jobs = browser.get("/api/jobs").json()["jobs"]
        assert [(j["name"], j["state"], j["total_steps"], j["owner"]) for j in jobs] == [
            ("shown", "QUEUED", 100, "admin")]
        job = browser.get("/api/jobs/shown").json()
        assert job["job"]["state"] == "QUEUED" and job["can_cancel"]
        assert [e["reason"] for e in job["events"]] == ["Created"]
        assert browser.get("/api/jobs/missing").status_code == 404


def test_list_filters_and_pages_through_thousands_of_jobs(client, api_plane):
    create(client, "labelled", labels={"team": "infra"})
    base = f"http://127.0.0.1:{api_plane.http_port}"
    now = utcnow() - timedelta(minutes=1)  # all older than "labelled"
    rows = [{"name": f"bulk-{i:05d}", "uid": str(uuid.uuid4()), "spec": {}, "state": "SUCCEEDED" if i % 2 else "FAILED",
             "owner": "bulk", "total_steps": 10, "current_step": 10, "create_time": now - timedelta(seconds=i),
             "update_time": now} for i in range(3000)]
    with api_plane.db.session() as session:
        session.execute(insert(Job), rows)
        session.execute(insert(JobLabel), [{"job_name": r["name"], "key": "batch", "value": str(i % 3)}
                                           for i, r in enumerate(rows)])

    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    engine = api_plane.db.engine
    event.listen(engine, "before_cursor_execute", count)
    auth = {"Authorization": f"Bearer {client.token}"}
    seen, token, pages = [], "", 0
    with httpx.Client(base_url=base, headers=auth, timeout=DEADLINE) as http:
        while True:
            before = len(statements)
            body = http.get("/api/jobs", params={"page_size": 500, "page_token": token}).json()
            assert len(statements) - before <= 6, statements[before:]  # bounded, whatever the page
            seen += [j["name"] for j in body["jobs"]]
            pages += 1
            token = body["next_page_token"]
            if not token:
                break
        assert pages == 7 and len(seen) == 3001 == len(set(seen))
        assert seen[0] == "labelled" and seen[1:3] == ["bulk-00000", "bulk-00001"]  # newest first

        failed = http.get("/api/jobs", params={"state": "FAILED", "label": "batch=0", "page_size": 1000}).json()
        assert len(failed["jobs"]) == 500 and {j["state"] for j in failed["jobs"]} == {"FAILED"}
        assert all(j["labels"] == {"batch": "0"} for j in failed["jobs"])
        infra = http.get("/api/jobs", params={"label": "team=infra"}).json()["jobs"]
        assert [j["name"] for j in infra] == ["labelled"]
        assert http.get("/api/jobs", params={"state": "NOPE"}).status_code == 400
        assert http.get("/api/jobs", params={"label": "novalue"}).status_code == 400
        other_filter = http.get("/api/jobs", params={"page_size": 500}).json()["next_page_token"]
        assert http.get("/api/jobs", params={"state": "FAILED", "page_token": other_filter}).status_code == 400
    event.remove(engine, "before_cursor_execute", count)


def test_cancel_follows_the_api_rule_and_refuses_other_origins(client, api_plane):
    create(client, "mine")
    base = f"http://127.0.0.1:{api_plane.http_port}"
    viewer = add_user(api_plane, "viewer", "user")
    cancel = f"{base}/api/jobs/mine/cancel"

    # Not the owner, not an admin: refused here and through gRPC alike.
    assert httpx.post(cancel, headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
    with pytest.raises(grpc.RpcError) as refused:
        client.jobs.CancelJob(js.CancelJobRequest(name="jobs/mine"),
                              metadata=[("authorization", f"Bearer {viewer}")])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not httpx.get(f"{base}/api/jobs/mine", headers={"Authorization": f"Bearer {viewer}"}
                         ).json()["can_cancel"]

    # The admin's session cookie sent from another site's page: refused (CSRF).
    cookies = httpx.post(f"{base}/login", data={"token": client.token, "next": "/"}).cookies
    assert httpx.post(cancel, cookies=cookies, headers={"Origin": "http://evil.example"}).status_code == 403
    done = httpx.post(cancel, cookies=cookies, headers={"Origin": base})
    assert done.status_code == 200
    job = client.jobs.GetJob(js.GetJobRequest(name="jobs/mine"), metadata=client.metadata)
    assert job.cancel_requested
    events = httpx.get(f"{base}/api/jobs/mine", cookies=cookies).json()["events"]
    assert events[-1]["type"] == "CancelRequested" and events[-1]["message"] == "cancel requested by admin"


def test_metrics_count_jobs_api_calls_restarts_and_commits(client, api_plane):
    create(client, "counted")
    with pytest.raises(grpc.RpcError):
        client.jobs.GetJob(js.GetJobRequest(name="jobs/absent"), metadata=client.metadata)
    with pytest.raises(grpc.RpcError):
        client.jobs.GetJob(js.GetJobRequest(name="jobs/counted"), metadata=[("authorization", "Bearer wrong")])

    api_plane.metrics.refresh()  # what its thread does every few seconds: read the job figures now
    response = httpx.get(f"http://127.0.0.1:{api_plane.http_port}/metrics")  # open: see the module's doc
    assert response.status_code == 200
    samples = metrics_of(response.text)
    assert samples[("roundhouse_jobs", (("state", "QUEUED"),))] == 1
    assert samples[("roundhouse_jobs", (("state", "RUNNING"),))] == 0
    create_job = "/roundhouse.v1.JobService/CreateJob"
    get_job = "/roundhouse.v1.JobService/GetJob"
    assert samples[("roundhouse_api_calls_total", (("code", "OK"), ("method", create_job)))] == 1
    assert samples[("roundhouse_api_calls_total", (("code", "NOT_FOUND"), ("method", get_job)))] == 1
    assert samples[("roundhouse_api_calls_total", (("code", "UNAUTHENTICATED"), ("method", get_job)))] == 1
    assert samples[("roundhouse_api_call_seconds_count", (("method", get_job),))] == 2
    assert samples[("roundhouse_job_restarts_total", ())] == 0
    assert samples[("roundhouse_checkpoint_commits_total", ())] == 0


def test_a_jobs_curve_comes_in_batches_after_a_cursor(client, api_plane, monkeypatch):
    from orchestrator.dashboard import app as dashboard_app

    create(client, "curve")
    with api_plane.db.session() as session:
        session.execute(insert(Metric), [{"job_name": "curve", "attempt": 1, "rank": 0, "step": step,
                                          "loss": 5.0 / step, "memory_bytes": 2**20} for step in range(1, 13)])
    monkeypatch.setattr(dashboard_app, "METRIC_BATCH", 5)
    auth = {"Authorization": f"Bearer {client.token}"}
    url = f"http://127.0.0.1:{api_plane.http_port}/api/jobs/curve"
    steps, after = [], 0
    while True:
        body = httpx.get(url, params={"after_metric": after}, headers=auth).json()
        steps += [m["step"] for m in body["metrics"]]
        if len(body["metrics"]) < body["metric_batch"]:
            break
        after = body["metrics"][-1]["id"]
    assert steps == list(range(1, 13))


def test_checkpoint_commits_is_a_counter_that_retention_does_not_lower(client, api_plane):
    from .test_trainer_service import COMMITTED, REMOVED, Ranks

    def commits() -> float:
        text = httpx.get(f"http://127.0.0.1:{api_plane.http_port}/metrics").text
        return metrics_of(text)[("roundhouse_checkpoint_commits_total", ())]

    ranks = Ranks(client, api_plane)
    ranks.report(COMMITTED, 10, path="/ck/step-10")
    ranks.report(COMMITTED, 10, path="/ck/step-10")  # a retried report is not another commit
    ranks.report(COMMITTED, 20, path="/ck/step-20")
    assert commits() == 2
    ranks.report(REMOVED, 10)  # retention deleted the row: the count of commits stays
    assert [c[0] for c in ranks.checkpoints()] == [20] and commits() == 2
    with pytest.raises(grpc.RpcError):  # a report of an attempt that has ended is refused: no commit
        ranks.report(COMMITTED, 10, attempt=1, path="/ck/old")
    ranks.report(COMMITTED, 30, path="/ck/step-30")
    assert commits() == 3


def test_an_owner_who_is_not_an_admin_may_cancel_their_own_job_both_ways(client, api_plane):
    owner = add_user(api_plane, "owner", "user")
    spec = spec_to_proto(parse_spec({"name": "owned"}))
    for name in ("owned", "owned-too"):
        spec.name = name
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=[("authorization", f"Bearer {owner}")])
    base = f"http://127.0.0.1:{api_plane.http_port}"
    assert httpx.get(f"{base}/api/jobs/owned", headers={"Authorization": f"Bearer {owner}"}).json()["can_cancel"]
    assert httpx.post(f"{base}/api/jobs/owned/cancel", headers={"Authorization": f"Bearer {owner}"}
                      ).status_code == 200
    job = client.jobs.CancelJob(js.CancelJobRequest(name="jobs/owned-too"),
                                metadata=[("authorization", f"Bearer {owner}")])
    assert job.cancel_requested and job.owner == "owner"


def test_the_job_page_shows_the_sigma_max_of_the_steps_that_carry_it(client, api_plane):
    create(client, "mup")
    sigma = {"blocks.0.attn.qkv.weight": 1.5, "head.out.weight": None}  # None: not finite when reported
    with api_plane.db.session() as session:
        session.execute(insert(Metric), [{"job_name": "mup", "attempt": 1, "rank": 0, "step": step, "loss": 5.0 / step,
                                          "sigma_max": sigma if step % 5 == 0 else None} for step in range(1, 11)])
    base = f"http://127.0.0.1:{api_plane.http_port}"
    auth = {"Authorization": f"Bearer {client.token}"}
    body = httpx.get(f"{base}/api/jobs/mup", headers=auth).json()
    assert [(m["step"], m.get("sigma_max")) for m in body["metrics"] if "sigma_max" in m] == [(5, sigma), (10, sigma)]
    assert len(body["metrics"]) == 10
    # The page's shell holds the section the script fills (shown once a point carries σ_max).
    page = httpx.get(f"{base}/jobs/mup", headers=auth).text
    assert 'id="sigma-section"' in page and 'id="chart-sigma"' in page and '<table id="sigma">' in page
    script = httpx.get(f"{base}/static/dashboard.js").text
    assert "m.sigma_max" in script and "drawSigma" in script
