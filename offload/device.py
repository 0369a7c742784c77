"""The accelerator as the offload engine sees it: slots of device memory, copies on named streams, events that
order them, Adam on device tensors, synchronisation and free memory.

Two implementations:
- `CudaDevice`: a thin layer over torch.cuda streams and events (constructed only where CUDA is available).
- `SimulatedDevice`: for CPU tests and benchmarks. Its memory is separate CPU tensors; each stream is a worker
  thread running its queue in order; copies are throttled to a bandwidth with jitter; allocation obeys a memory
  cap. Every copy first fills its destination with NaN and only writes the real values after its simulated
  transfer time, and freed or fresh slots hold NaN, so a copy or an update that is not ordered by an event reads
  NaN or stale values and the test that checks the numbers fails.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.optim import adamw as torch_adamw

# The three streams the hybrid optimizer uses: state in, update, state out.
H2D, COMPUTE, D2H = "h2d", "compute", "d2h"


class DeviceOutOfMemory(RuntimeError):
    pass


@dataclass(frozen=True)
class AdamHyper:
    """One parameter group's AdamW hyperparameters (decoupled weight decay, as torch.optim.AdamW)."""
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def adamw_fused(params, grads, exp_avgs, exp_avg_sqs, steps, hyper: AdamHyper) -> None:
    """torch's fused AdamW kernel on lists of tensors (one device). `steps` are the step counts *before* this
    update, one scalar float32 tensor each, incremented in place as torch.optim.AdamW does."""
    torch_adamw.adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False,
                      beta1=hyper.beta1, beta2=hyper.beta2, lr=hyper.lr, weight_decay=hyper.weight_decay,
                      eps=hyper.eps, maximize=False)


class Event(Protocol):
    def synchronize(self) -> None: ...


class Device(Protocol):
    """What the hybrid optimizer needs from an accelerator. Host tensors passed to copies must stay alive and
    unmodified until the copy's stream has passed an event the caller waits on."""

    name: str

    def allocate(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...
    def free(self, tensor: torch.Tensor) -> None: ...
    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None: ...
    def record(self, stream: str) -> Event: ...
    def wait(self, stream: str, event: Event) -> None: ...
    def adamw(self, stream: str, params, grads, exp_avgs, exp_avg_sqs, step: float, hyper: AdamHyper) -> None: ...
    def synchronize(self) -> None: ...
    def free_memory(self) -> int: ...
    def pin(self, tensor: torch.Tensor) -> torch.Tensor: ...


class CudaDevice:
    """torch.cuda streams and events. Slots are allocated on the current device; copies are non-blocking (the
    host side must be pinned for them to overlap)."""

    def __init__(self, index: int | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaDevice needs CUDA; use SimulatedDevice on a CPU-only machine")
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.name = torch.cuda.get_device_name(self.device)
        self._streams: dict[str, torch.cuda.Stream] = {}

    def _stream(self, name: str) -> torch.cuda.Stream:
        if name not in self._streams:
            self._streams[name] = torch.cuda.Stream(device=self.device)
        return self._streams[name]

    def allocate(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        try:
            return torch.empty(numel, dtype=dtype, device=self.device)
        except torch.OutOfMemoryError as e:
            raise DeviceOutOfMemory(str(e)) from e

    def free(self, tensor: torch.Tensor) -> None:
        # Slots are used on side streams: let every stream finish with them before the allocator reuses them.
        self.synchronize()
        del tensor

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream(stream)):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: str):
        event = torch.cuda.Event()
        event.record(self._stream(stream))
        return event

    def wait(self, stream: str, event) -> None:
        self._stream(stream).wait_event(event)

    def adamw(self, stream: str, params, grads, exp_avgs, exp_avg_sqs, step: float, hyper: AdamHyper) -> None:
        with torch.cuda.stream(self._stream(stream)):
            steps = [torch.full((), step, dtype=torch.float32, device=self.device) for _ in params]
            adamw_fused(params, grads, exp_avgs, exp_avg_sqs, steps, hyper)

    def synchronize(self) -> None:
        for s in self._streams.values():
            s.synchronize()

    def free_memory(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return free

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_pinned() else tensor.pin_memory()


class _SimEvent:
    def __init__(self):
        self._done = threading.Event()

    def synchronize(self) -> None:
        self._done.wait()


class _SimStream:
    """A worker thread that runs its queue in order, as a CUDA stream does."""

    def __init__(self, name: str):
        self.name = name
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"simdevice-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            work = self.queue.get()
            if work is None:
                return
            try:
                # Grad mode is per thread; the host views are of tensors that may require grad.
                with torch.no_grad():
                    work()
            except BaseException as e:  # surfaced by synchronize()
                self.error = e


class SimulatedDevice:
    """A device made of CPU tensors and worker threads (see the module docstring).

    h2d_bytes_per_s / d2h_bytes_per_s: each copy sleeps bytes / bandwidth (None: no throttle); jitter: each
    duration is scaled by a random factor in [1, 1 + jitter) (seeded); adam_elems_per_s: the update sleeps too;
    memory_bytes: the cap on allocated slots."""

    def __init__(self, memory_bytes: int = 1 << 30, h2d_bytes_per_s: float | None = None,
                 d2h_bytes_per_s: float | None = None, adam_elems_per_s: float | None = None,
                 jitter: float = 0.0, seed: int = 0):
        self.name = "simulated"
        self.memory_bytes = memory_bytes
        self.h2d_bytes_per_s = h2d_bytes_per_s
        self.d2h_bytes_per_s = d2h_bytes_per_s
        self.adam_elems_per_s = adam_elems_per_s
        self.jitter = jitter
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._allocated: dict[int, int] = {}  # id(slot) -> bytes
        self._streams: dict[str, _SimStream] = {}

    # memory -------------------------------------------------------------------------------------------------
    def allocate(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        with self._lock:
            used = sum(self._allocated.values())
            if used + nbytes > self.memory_bytes:
                raise DeviceOutOfMemory(f"simulated device: {nbytes} bytes asked, {self.memory_bytes - used} free "
                                        f"of {self.memory_bytes}")
            slot = torch.full((numel,), float("nan"), dtype=dtype)
            self._allocated[id(slot)] = nbytes
        return slot

    def free(self, tensor: torch.Tensor) -> None:
        self.synchronize()
        with self._lock:
            self._allocated.pop(id(tensor), None)
        tensor.fill_(float("nan"))  # a stale reference to a freed slot reads NaN

    def allocated_bytes(self) -> int:
        with self._lock:
            return sum(self._allocated.values())

    def free_memory(self) -> int:
        return self.memory_bytes - self.allocated_bytes()

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # streams ------------------------------------------------------------------------------------------------
    def _stream(self, name: str) -> _SimStream:
        with self._lock:
            if name not in self._streams:
                self._streams[name] = _SimStream(name)
            return self._streams[name]

    def _duration(self, amount: float, rate: float | None) -> float:
        if not rate:
            return 0.0
        with self._lock:
            factor = 1.0 + self._random.random() * self.jitter
        return amount / rate * factor

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"copy: shapes differ {tuple(dst.shape)} vs {tuple(src.shape)}")
        rate = self.d2h_bytes_per_s if stream == D2H else self.h2d_bytes_per_s
        seconds = self._duration(src.numel() * src.element_size(), rate)

        def work():
            dst.fill_(float("nan"))  # in flight: whoever reads dst before the copy's event sees NaN
            if seconds:
                time.sleep(seconds)
            dst.copy_(src)
        self._stream(stream).queue.put(work)

    def record(self, stream: str) -> _SimEvent:
        event = _SimEvent()
        self._stream(stream).queue.put(event._done.set)
        return event

    def wait(self, stream: str, event: _SimEvent) -> None:
        self._stream(stream).queue.put(event._done.wait)

    def adamw(self, stream: str, params, grads, exp_avgs, exp_avg_sqs, step: float, hyper: AdamHyper) -> None:
        seconds = self._duration(sum(p.numel() for p in params), self.adam_elems_per_s)

        def work():
            if seconds:
                time.sleep(seconds)
            steps = [torch.full((), step, dtype=torch.float32) for _ in params]
            adamw_fused(params, grads, exp_avgs, exp_avg_sqs, steps, hyper)
        self._stream(stream).queue.put(work)

    def synchronize(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            done = threading.Event()
            s.queue.put(done.set)
            done.wait()
        for s in streams:
            if s.error is not None:
                error, s.error = s.error, None
                raise RuntimeError(f"simulated device: stream {s.name!r} failed") from error

    def close(self) -> None:
        """Stop the worker threads (they are daemons, so forgetting this leaks nothing past the process)."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.queue.put(None)
            s.thread.join()


def cuda_available() -> bool:
    return torch.cuda.is_available()
