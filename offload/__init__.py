"""Interleaved optimizer-state offloading (issue 15): with the optimizer state in pinned host memory under
DeepSpeed's ZeRO-1 CPU offload, each step updates some subgroups of it on the accelerator while the CPU updates
the rest, split by a performance model of the machine.

  device.py       the accelerator: CUDA, or a simulated device for CPU tests
  subgroups.py    cutting flat host tensors into subgroups; placements (which go to the device)
  hybrid_adam.py  HybridAdam, the optimizer DeepSpeed steps
  perf_model.py   the performance model (pure functions) and machine profiles (profiles/*.json)
  calibrate.py    measuring a machine's rates
  plan.py         does a model fit with and without offload; `python -m offload plan`
  build.py        the trainer's entry point: build(settings, param_groups, ...)

See docs/offload.md."""

from offload.build import Built, OffloadSettings, build, ds_config_for, merge_ds_config
from offload.device import CudaDevice, SimulatedDevice
from offload.hybrid_adam import HybridAdam
from offload.subgroups import Placement

__all__ = ["Built", "CudaDevice", "HybridAdam", "OffloadSettings", "Placement", "SimulatedDevice", "build",
           "ds_config_for", "merge_ds_config"]
