"""Calibration: the performance model's inputs measured on this rank's own device and cores, in about a second.

Each figure is the median of a few timed repeats after one warm-up: pinned copy bandwidth each way alone and
with both directions running, fused CPU AdamW alone and while copies run, the device's fused AdamW, and the
device memory free now (call it where the update will run, after the model and its activations are allocated).
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from offload.device import COMPUTE, D2H, H2D, AdamHyper, Device, SimulatedDevice, adamw_fused
from offload.perf_model import MachineProfile

_HYPER = AdamHyper(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-touch of pages, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: Device, numel: int = 1 << 24, repeats: int = 3, name: str | None = None) -> MachineProfile:
    """Measure `device` and this process's CPU (with torch's current thread count) on tensors of `numel` fp32
    elements (64 MiB by default)."""
    nbytes = numel * 4
    host = [device.pin(torch.rand(numel)) for _ in range(4)]
    slots = [device.allocate(numel) for _ in range(4)]
    try:
        def h2d():
            device.copy(H2D, slots[0], host[0])
            device.record(H2D).synchronize()

        def d2h():
            device.copy(D2H, host[1], slots[1])
            device.record(D2H).synchronize()

        def both():
            device.copy(H2D, slots[0], host[0])
            device.copy(D2H, host[1], slots[1])
            a, b = device.record(H2D), device.record(D2H)
            a.synchronize()
            b.synchronize()

        h2d_s = _median_seconds(h2d, repeats)
        d2h_s = _median_seconds(d2h, repeats)
        both_s = _median_seconds(both, repeats)

        cpu_tensors = [torch.rand(numel) for _ in range(4)]

        def cpu_adam():
            p, g, m, v = cpu_tensors
            adamw_fused([p], [g], [m], [v], [torch.tensor(1.0)], _HYPER)

        cpu_s = _median_seconds(cpu_adam, repeats)

        # CPU Adam while copies keep both directions busy (the copies run on the device's own threads/engines).
        stop = threading.Event()

        def keep_copying():
            while not stop.is_set():
                both()
        copier = threading.Thread(target=keep_copying, daemon=True)
        copier.start()
        try:
            cpu_busy_s = _median_seconds(cpu_adam, repeats)
        finally:
            stop.set()
            copier.join()

        def device_adam():
            device.adamw(COMPUTE, [slots[0]], [slots[1]], [slots[2]], [slots[3]], 1.0, _HYPER)
            device.record(COMPUTE).synchronize()

        for s in slots:  # defined values for the update (a fresh simulated slot holds NaN)
            device.copy(H2D, s, host[2])
        device.synchronize()
        device_s = _median_seconds(device_adam, repeats)
    finally:
        for s in slots:
            device.free(s)
    total = (torch.cuda.mem_get_info()[1] if device.name != "simulated" else device.memory_bytes)
    return MachineProfile(
        name=name or f"measured-{device.name}".replace(" ", "-").lower(),
        estimate=False,
        source=f"offload.calibrate on {device.name}, {torch.get_num_threads()} CPU threads, {numel} elements",
        h2d_bytes_per_s=nbytes / h2d_s,
        d2h_bytes_per_s=nbytes / d2h_s,
        h2d_concurrent_bytes_per_s=nbytes / both_s,
        d2h_concurrent_bytes_per_s=nbytes / both_s,
        cpu_adam_params_per_s=numel / cpu_s,
        cpu_adam_during_copies_params_per_s=numel / cpu_busy_s,
        device_adam_params_per_s=numel / device_s,
        device_memory_bytes=int(total),
        device_free_bytes=int(device.free_memory()),
    )


def default_device() -> Device:
    """The CUDA device where there is one; otherwise a simulated one (its figures then describe this CPU and
    the simulator's throttles, useful only to exercise the code)."""
    from offload.device import CudaDevice, cuda_available
    if cuda_available():
        return CudaDevice()
    return SimulatedDevice(memory_bytes=4 << 30, h2d_bytes_per_s=8e9, d2h_bytes_per_s=8e9)
