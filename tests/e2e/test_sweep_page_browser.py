"""The dashboard's sweep page in a real browser (Debian's headless Chromium through Playwright), against a
control plane that launches nothing: the sweep's trials and target are given their ends by hand, as the
sweep controller and job controller would leave them."""

from __future__ import annotations

import pytest

from contract.sweep import parse_sweep, sweep_to_proto
from orchestrator.config import token_file
from orchestrator.controller import SweepController
from orchestrator.store import Job, JobState, Metric, utcnow
from roundhouse.v1 import sweep_service_pb2 as ss, sweep_service_pb2_grpc

from tests.conftest import Client, start_plane
from tests.e2e.test_dashboard_browser import ARTIFACTS, browser, logged_in_page  # noqa: F401 (the browser fixture)
from tests.integration.test_sweeps import sweep_data

pytestmark = pytest.mark.slow


def end(plane, job: str, state: JobState, val_losses=()) -> None:
    with plane.db.session() as session:
        row = session.get(Job, job)
        row.state, row.start_time, row.end_time, row.current_step = state, utcnow(), utcnow(), 20
        for step, loss in enumerate(val_losses, 1):
            session.add(Metric(job_name=job, attempt=1, rank=0, step=step * 5, val_loss=loss, time=utcnow()))


def test_the_sweep_page_shows_trials_the_chosen_point_the_target_and_the_cost(browser, tmp_path):  # noqa: F811
    plane = start_plane(tmp_path / "home", None, reconcile=False)
    try:
        client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
        stub = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
        spec, _ = parse_sweep(sweep_data(grid={"learning_rates": [0.01, 0.003, 0.001]}, max_parallel=3))
        stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)), metadata=client.metadata)
        controller = SweepController(plane.db, lambda name: None)  # passes by hand: nothing is launched
        controller.reconcile("lr")
        end(plane, "lr-t0", JobState.SUCCEEDED, [4.0, 3.0, 3.0])
        end(plane, "lr-t1", JobState.SUCCEEDED, [3.0, 2.0, 2.0])
        end(plane, "lr-t2", JobState.FAILED)
        controller.reconcile("lr")

        page = logged_in_page(browser, plane, client.token, "/sweeps/lr")
        page.wait_for_function("() => document.querySelectorAll('#trials tbody tr').length === 3")
        rows = page.locator("#trials tbody tr").all_inner_texts()
        assert "★" in rows[1] and "2.0000" in rows[1] and "∞" in rows[2]
        assert page.locator("#sweep-state").inner_text() == "TRAINING_TARGET"
        assert page.locator("#target a").get_attribute("href") == "/jobs/lr-target"
        assert "lr-t1" in page.locator("#best").inner_text()
        assert page.locator("#cost-flops").inner_text().endswith("%")
        points = page.evaluate("() => document.getElementById('chart-sweep').data.map(t => t.x.length)")
        assert points == [2, 1]  # the two scored trials, and the chosen point
        assert page.evaluate("() => window.cspViolations") == []  # Plotly lives with the CSP
        page.screenshot(path=str(ARTIFACTS / "sweep.png"), full_page=True)
        page.context.close()
        client.close()
    finally:
        plane.stop()
