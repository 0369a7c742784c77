"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a control plane
in this process running one small real training job that all the tests share.

Screenshots land in test-artifacts/ (gitignored)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from orchestrator.auth import digest, new_token
from orchestrator.config import token_file
from contract.spec import parse_spec, spec_to_proto
from orchestrator.store import ApiToken, Job
from roundhouse.v1 import job_service_pb2 as js

from tests.conftest import Client, processes_of, start_plane
from tests.support.waiting import DEADLINE

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# What works on the project's machines (shared/FINDINGS.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
JOB = "dash-live"


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    home = tmp_path_factory.mktemp("dashboard") / "home"
    plane = start_plane(home, f"sqlite:///{home.parent / 'roundhouse.db'}", reconcile=True)
    yield plane
    plane.stop()
    for pid in processes_of(JOB):  # the last test cancels the job; make sure nothing outlives the module
        pytest.fail(f"rank process {pid} of {JOB} still running")


@pytest.fixture(scope="module")
def admin(plane):
    client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    yield client
    client.close()


@pytest.fixture(scope="module")
def running_job(plane, admin):
    """A tiny GPT on two data-parallel ranks, long enough to watch it advance; the last test cancels it. Under µP
    at its base width (the standard parametrization's numbers, as no weight decay is set), so that it reports
    σ_max every 10 steps."""
    spec = spec_to_proto(parse_spec({
        "name": JOB, "labels": {"team": "ml-infra"},
        "model": {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32,
                  "mup": {"base_hidden_size": 32, "sigma_every_steps": 10}},
        "parallelism": {"dp": 2},
        "training": {"steps": 5000, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 10},
        "checkpoint": {"interval": 20}}))
    admin.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=admin.metadata)
    wait_until(lambda: job_row(plane).current_step >= 3, "the job trains a few steps", timeout=DEADLINE)
    yield JOB
    if job_row(plane).state not in ("CANCELLED", "SUCCEEDED", "FAILED"):
        admin.jobs.CancelJob(js.CancelJobRequest(name=f"jobs/{JOB}"), metadata=admin.metadata)
    wait_until(lambda: job_row(plane).state == "CANCELLED" and not processes_of(JOB), "the job stops", timeout=DEADLINE)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium (or apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def job_row(plane) -> Job:
    with plane.db.read() as session:
        return session.get(Job, JOB)


def wait_until(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.2)


# Records what the Content-Security-Policy blocks (an init script is the browser's own: the policy allows it).
RECORD_CSP_VIOLATIONS = ("window.cspViolations = []; document.addEventListener('securitypolicyviolation', "
                         "e => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));")


def logged_in_page(browser, plane, token: str, path: str = "/"):
    context = browser.new_context(base_url=f"http://127.0.0.1:{plane.http_port}", viewport={"width": 1400,
                                                                                              "height": 1000})
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    page.goto(path)
    assert page.url.split("?")[0].endswith("/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(path) + "$"))
    return page


def add_user(plane, user: str, role: str) -> str:
    token = new_token()
    with plane.db.session() as session:
        session.add(ApiToken(user=user, role=role, token_hash=digest(token)))
    return token


def loss_points(page) -> int:
    return page.evaluate("() => { const c = document.getElementById('chart-loss'); "
                         "return c.data && c.data.length ? c.data[0].x.length : 0; }")


def test_without_a_token_the_browser_lands_on_the_login_page(browser, plane, running_job):
    context = browser.new_context(base_url=f"http://127.0.0.1:{plane.http_port}")
    page = context.new_page()
    page.goto(f"/jobs/{running_job}")
    assert page.url.endswith(f"/login?next=/jobs/{running_job}")
    page.fill("#token", "not-a-token")
    page.click("button[type=submit]")
    assert page.locator("#login-error").inner_text() == "Unknown token."
    assert page.evaluate("() => fetch('/api/jobs').then(r => r.status)") == 401
    context.close()


def test_list_and_job_page_show_the_running_job_and_update_live(browser, plane, admin, running_job):
    page = logged_in_page(browser, plane, admin.token)
    row = page.locator(f"#jobs tbody tr[data-job='{running_job}']")
    row.wait_for()
    assert row.locator(".state").inner_text() == "RUNNING"
    assert row.locator(".layout").inner_text() == "1×1×2"
    assert "team=ml-infra" in row.inner_text() and "admin" in row.inner_text()
    page.screenshot(path=ARTIFACTS / "dashboard-jobs.png")

    # The filters: by state, by label (the form reloads the list with the filter in its address).
    page.select_option("#state-filter", "SUCCEEDED")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**/?state=SUCCEEDED")
    page.wait_for_function("() => document.getElementById('updated').textContent.startsWith('Updated')")
    assert page.locator("#jobs tbody tr").count() == 0
    page.select_option("#state-filter", "")
    page.fill("#label-filter", "team=ml-infra")
    page.click("#filters button[type=submit]")
    row.wait_for()

    row.locator("a").click()
    page.wait_for_url(f"**/jobs/{running_job}")
    page.wait_for_function("() => document.getElementById('job-state').textContent === 'RUNNING'")
    assert page.locator("#job-layout").inner_text().startswith("1×1×2")
    page.wait_for_function("() => { const c = document.getElementById('chart-loss'); "
                           "return c.data && c.data.length && c.data[0].x.length >= 1; }")
    events = page.locator("#events tbody").inner_text()
    assert "QUEUED → LAUNCHING" in events and "LAUNCHING → RUNNING" in events
    assert page.locator("#attempts tbody tr").count() == 1
    assert page.locator("#timeline").inner_text().startswith("#1 1×1×2 · 2 ranks")

    # The page advances by itself: same document (the marker survives), more steps and more points.
    page.evaluate("() => { window.stillTheSamePage = true; }")
    step, points = int(page.locator("#job-step").inner_text()), loss_points(page)
    page.wait_for_function(f"() => Number(document.getElementById('job-step').textContent) > {step} + 5",
                           timeout=DEADLINE * 1000)
    page.wait_for_function(f"() => document.getElementById('chart-loss').data[0].x.length > {points}")
    assert page.evaluate("() => window.stillTheSamePage") is True

    # Checkpoints, validation loss and memory curves, ranks with heartbeats, a rank's log tail.
    page.wait_for_function("() => document.querySelectorAll('#checkpoints tbody tr').length >= 1", timeout=DEADLINE * 1000)
    assert "1×1×2" in page.locator("#checkpoints tbody tr").first.inner_text()
    page.wait_for_function("() => document.getElementById('chart-loss').data.length === 2", timeout=DEADLINE * 1000)
    assert page.evaluate("() => document.getElementById('chart-memory').data[0].y[0]") > 10  # MiB
    assert page.locator("#ranks tbody tr").count() == 2
    page.locator("#ranks .show-log").first.click()
    page.wait_for_function("() => /step \\d+\\/5000 loss/.test(document.getElementById('log').textContent)")
    # µP's σ_max: a row per matrix (token and position embeddings, 4 per block, the readout) and a trace each.
    page.wait_for_function("() => document.querySelectorAll('#sigma tbody tr').length === 11", timeout=DEADLINE * 1000)
    assert page.locator("#sigma-section").is_visible()
    assert "blocks.1.mlp.proj.weight" in page.locator("#sigma tbody").inner_text()
    assert page.evaluate("() => document.getElementById('chart-sigma').data.length") == 11
    page.screenshot(path=ARTIFACTS / "dashboard-job.png", full_page=True)
    assert page.evaluate("() => window.cspViolations") == []  # the charts and the script live with the CSP

    # The browser holds a session id, not the token; logging out ends it.
    [cookie] = page.context.cookies()
    assert cookie["name"] == "roundhouse_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] != admin.token and cookie["expires"] > time.time()
    page.click("header form.logout button")
    page.wait_for_url("**/login")
    assert page.context.cookies() == []
    page.goto(f"/jobs/{running_job}")
    assert page.url.split("?")[0].endswith("/login")
    page.context.close()


def test_only_a_permitted_user_can_cancel_from_the_page(browser, plane, admin, running_job):
    viewer = logged_in_page(browser, plane, add_user(plane, "viewer", "user"), f"/jobs/{running_job}")
    viewer.wait_for_function("() => document.getElementById('job-state').textContent === 'RUNNING'")
    assert viewer.locator("#cancel").is_hidden()
    status = viewer.evaluate(f"() => fetch('/api/jobs/{running_job}/cancel', {{method: 'POST'}}).then(r => r.status)")
    assert status == 403
    assert not job_row(plane).cancel_requested
    viewer.context.close()

    page = logged_in_page(browser, plane, admin.token, f"/jobs/{running_job}")
    page.locator("#cancel").wait_for(state="visible")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    page.wait_for_function("() => document.getElementById('job-state').textContent === 'CANCELLED'",
                           timeout=DEADLINE * 1000)
    assert "cancel requested by admin" in page.locator("#events tbody").inner_text()
    assert page.locator("#cancel").is_hidden()
    page.screenshot(path=ARTIFACTS / "dashboard-cancelled.png", full_page=True)
    page.context.close()
