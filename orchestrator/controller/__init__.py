"""The control plane's controllers: a small runtime (a work queue keyed by name, N workers, timers and a
periodic resync) and the controllers that run on it: jobs, and sweeps (which own jobs). The failure policy
has its own module."""

from orchestrator.controller.job_controller import JobController, ReconcilerSettings
from orchestrator.controller.runtime import ControllerRuntime, WorkQueue
from orchestrator.controller.sweep_controller import SweepController

__all__ = ["ControllerRuntime", "JobController", "ReconcilerSettings", "SweepController", "WorkQueue"]
