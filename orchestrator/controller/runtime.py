"""A small controller runtime: a work queue keyed by object name, and N workers that reconcile the keys.

The queue holds a key at most once, and never hands a key to a second worker while one works it: a key
added meanwhile is marked dirty and queued again once that worker is done, so the newest state is always
looked at. A reconcile function is level-triggered (it reads durable state and converges) and says when it
wants to look again (a backoff, a hang check, a stop's grace); notifications (a new job, a cancel, a rank
that exited) add a key at once; a periodic resync adds every unfinished key, so a lost notification only
delays. Nothing here is state: a control plane started afresh resyncs and carries on."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# What a reconcile function returns: seconds until it wants to look at the key again (0: as soon as a worker
# is free, after the keys already queued), or None: only when notified or at the next resync.
Requeue = float | None
# A pass that raised (a database hiccup, a launcher error) is retried after this long, not spun on.
RETRY_AFTER_ERROR_SECONDS = 5.0


class WorkQueue:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()  # in _ready
        self._working: set[str] = set()
        self._dirty: set[str] = set()  # added while being worked: queued again when done
        self._delayed: list[tuple[float, int, str]] = []  # heap of (due, tie-breaker, key), monotonic seconds
        self._order = itertools.count()
        self._shut = False

    def add(self, key: str) -> None:
        with self._lock:
            self._add(key)

    def add_all(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._add(key)

    def add_after(self, key: str, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        with self._lock:
            heapq.heappush(self._delayed, (time.monotonic() + seconds, next(self._order), key))
            self._lock.notify()  # a waiting worker's timeout may now be too long

    def get(self) -> str | None:
        """The next key to work (blocks); None once the queue is shut down. Call `done(key)` after."""
        with self._lock:
            while not self._shut:
                self._promote_due()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._working.add(key)
                    return key
                timeout = self._delayed[0][0] - time.monotonic() if self._delayed else None
                self._lock.wait(timeout)
            return None

    def done(self, key: str) -> None:
        with self._lock:
            self._working.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add(key)

    def shut_down(self) -> None:
        with self._lock:
            self._shut = True
            self._lock.notify_all()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready) + len(self._dirty)

    def _add(self, key: str) -> None:  # lock held
        if key in self._working:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._lock.notify()

    def _promote_due(self) -> None:  # lock held
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            self._add(heapq.heappop(self._delayed)[2])


class ControllerRuntime:
    """Runs `reconcile(key)` on `workers` threads, fed by `notify`, the reconcile function's own requeues and a
    resync every `resync_seconds` of every key `list_keys()` returns (also at start: adoption after a
    restart)."""

    def __init__(self, name: str, reconcile: Callable[[str], Requeue], list_keys: Callable[[], list[str]],
                 workers: int, resync_seconds: float):
        if workers < 1:
            raise ValueError(f"controller workers must be at least 1, not {workers}")
        self.name = name
        self.queue = WorkQueue()
        self._reconcile = reconcile
        self._list_keys = list_keys
        self._workers = workers
        self._resync_seconds = resync_seconds
        self._resync_now = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._work, name=f"{self.name}-worker-{i}", daemon=True)
                         for i in range(self._workers)]
        self._threads.append(threading.Thread(target=self._resync_loop, name=f"{self.name}-resync", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops taking keys; a pass under way finishes (passes never wait on ranks)."""
        self._stopping.set()
        self._resync_now.set()
        self.queue.shut_down()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def notify(self, key: str) -> None:
        """Something about `key` changed: look at it as soon as a worker is free."""
        self.queue.add(key)

    def resync(self) -> None:
        """Look at every unfinished key soon (when what changed has no single key)."""
        self._resync_now.set()

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            again: Requeue = None
            try:
                again = self._reconcile(key)
            except Exception:
                log.exception("%s: reconciling %s failed", self.name, key)
                again = RETRY_AFTER_ERROR_SECONDS
            finally:
                self.queue.done(key)
            if again is not None and not self._stopping.is_set():
                self.queue.add_after(key, again)

    def _resync_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.queue.add_all(self._list_keys())
            except Exception:
                log.exception("%s: listing keys to resync failed", self.name)
            self._resync_now.wait(self._resync_seconds)
            self._resync_now.clear()
