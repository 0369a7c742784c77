"""Finding and killing every process a test started.

Ranks lead their own process groups and treat SIGTERM as "checkpoint at the next step", so a test that
fails half-way would leave them running. The sweep kills whole process groups with SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (Linux only; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(root: int | None = None) -> set[int]:
    """Every live process below `root` (default: this one)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def started_since(before: set[int]) -> set[int]:
    """The processes below this one that the test itself started: new ones whose parent is this process (its
    children, and orphans re-parented to it) or another such new one; not those a process that was already
    running has started since (a module-scoped browser's renderers belong to the browser)."""
    parents = _parents()
    new = descendants() - before
    ours: set[int] = set()
    me = os.getpid()
    changed = True
    while changed:
        changed = False
        for pid in new - ours:
            if parents.get(pid) == me or parents.get(pid) in ours:
                ours.add(pid)
                changed = True
    return ours


def kill_all(pids: set[int], wait_seconds: float = 30.0) -> None:
    """SIGKILL each process's group (never our own) and the process itself, then reap what is ours."""
    own_group = os.getpgrp()
    for pid in pids:
        try:
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_seconds
    while pids & set(_parents()) and time.monotonic() < deadline:
        _reap(pids)
        time.sleep(0.05)
    _reap(pids)


def _reap(pids: set[int]) -> None:
    """Collects the exit status of those of `pids` that are our children (re-parented orphans included), so
    none stays a zombie. Only these: another fixture's Popen must still get its own child's status."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
