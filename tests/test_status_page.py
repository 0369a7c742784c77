"""The minimal status page over HTTP: the job list, a job's page, JSON, and Prometheus metrics."""

from __future__ import annotations

import httpx

from orchestrator.spec import parse_spec, spec_to_proto
from roundhouse.v1 import job_service_pb2 as js


def test_status_page_lists_jobs_and_shows_one(client, api_plane):
    spec = spec_to_proto(parse_spec({"name": "shown", "parallelism": {"dp": 2},
                                     "training": {"global_batch_size": 8, "micro_batch_size": 4}}))
    client.jobs.CreateJob(js.CreateJobRequest(spec=spec), metadata=client.metadata)
    base = f"http://127.0.0.1:{api_plane.http_port}"

    listing = httpx.get(f"{base}/")
    assert listing.status_code == 200
    assert "href='/jobs/shown'" in listing.text and "QUEUED" in listing.text

    page = httpx.get(f"{base}/jobs/shown")
    assert page.status_code == 200
    assert "<h1>shown</h1>" in page.text and "Created" in page.text  # the first event is listed

    assert httpx.get(f"{base}/jobs/missing").status_code == 404
    jobs = httpx.get(f"{base}/api/jobs").json()["jobs"]
    assert [(j["name"], j["state"], j["total_steps"]) for j in jobs] == [("shown", "QUEUED", 100)]

    metrics = httpx.get(f"{base}/metrics").text
    assert 'roundhouse_jobs{state="QUEUED"} 1.0' in metrics
    assert 'roundhouse_jobs{state="RUNNING"} 0.0' in metrics
