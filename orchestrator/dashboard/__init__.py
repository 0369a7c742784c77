"""The job status dashboard, served from the control plane's HTTP port: a jobs list and a page per job
that update themselves from JSON endpoints, a login page, a cancel button, and Prometheus /metrics."""

from orchestrator.dashboard.app import create_app
from orchestrator.dashboard.metrics import ServiceMetrics

__all__ = ["ServiceMetrics", "create_app"]
