"""The snapshot of a save: this rank's partition of the weights and moments, copied into buffers kept from save
to save (one copy, no allocation after the first save, no collective).

An asynchronous save takes its snapshot in a background thread while the training loop runs the next step's
forward and backward, which leave the weights and moments alone; the loop waits for the copy right before
the optimizer step changes them (Checkpointer.wait_for_snapshot), then the thread goes on to write."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainers.optimizer_state import Fragment


class SnapshotBuffers:
    """Where snapshots are copied to: a buffer per (kind, global name), reused by every save. On GPUs the
    buffers are pinned host memory, filled on a stream of their own: the copy runs at full PCIe speed, and all
    that follows (the gather, the write) works on host memory, off the GPU."""

    def __init__(self):
        self.buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.copy_stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def training_done(self):
        """Marks, on GPUs, where the training stream is now: the copy starts once the GPU has got there."""
        if self.copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def copy(self, fragments: list[Fragment], ready=None) -> list[torch.Tensor | None]:
        """Copies each fragment's live state into its buffer; returns the buffers, in the fragments' order
        (None where this rank holds none of the parameter). When it returns, the buffers hold the state."""
        buffers: list[torch.Tensor | None] = []
        for fragment in fragments:
            source = fragment.source
            if source is None:
                buffers.append(None)
                continue
            key = (fragment.kind, fragment.name)
            buffer = self.buffers.get(key)
            if buffer is None or buffer.shape != source.shape:
                buffer = self.buffers[key] = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
            buffers.append(buffer)
        pairs = [(b, f.source) for b, f in zip(buffers, fragments, strict=True) if b is not None]
        if self.copy_stream is None:
            for buffer, source in pairs:
                buffer.copy_(source)
            return buffers
        with torch.cuda.stream(self.copy_stream):
            if ready is not None:
                self.copy_stream.wait_event(ready)
            for buffer, source in pairs:
                buffer.copy_(source, non_blocking=True)
        self.copy_stream.synchronize()
        return buffers


@dataclass
class PendingSave:
    """An asynchronous save in flight: its snapshot copy, then its write, in a thread of their own."""

    step: int
    thread: threading.Thread | None = None
    copied: threading.Event = field(default_factory=threading.Event)  # set once the copy is done (or failed)
    blocked: float = 0.0  # seconds the training thread has waited for this save
    settled: bool = False  # its blocked time is final
    error: BaseException | None = None

    @classmethod
    def start(cls, step: int, copy: Callable[[], Any], write: Callable[[Any], None]) -> PendingSave:
        """Runs `write(copy())` in a background thread; an error in either is kept for `Checkpointer.wait`."""
        pending = cls(step)

        def run() -> None:
            try:
                try:
                    copied = copy()
                finally:
                    pending.copied.set()  # also on failure: the training loop must not wait forever
                write(copied)
            except BaseException as exc:  # surfaced by Checkpointer.wait on the training thread
                pending.error = exc

        pending.thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=True)
        pending.thread.start()
        return pending

    def wait_for_copy(self) -> bool:
        """Blocks until the snapshot is copied, counting the wait as blocked time; True the first time (the
        blocked time is then final), False after."""
        if self.settled:
            return False
        waited = time.perf_counter()
        self.copied.wait()
        self.blocked += time.perf_counter() - waited
        self.settled = True
        return True
