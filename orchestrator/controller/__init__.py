"""The control plane's controllers: a small runtime (a work queue keyed by name, N workers, timers and a
periodic resync) and the job controller that runs on it. The failure policy has its own module."""

from orchestrator.controller.job_controller import JobController, ReconcilerSettings
from orchestrator.controller.runtime import ControllerRuntime, WorkQueue

__all__ = ["ControllerRuntime", "JobController", "ReconcilerSettings", "WorkQueue"]
