"""One deadline for every wait on a condition in the tests.

Tests wait for facts (a job's state, a file, a process gone), never for a time. On an idle machine each wait
ends in seconds; the deadline only bounds a wait on a stalled or overloaded one, so it is generous and set
once: ROUNDHOUSE_TEST_DEADLINE seconds (default 600)."""

from __future__ import annotations

import os
import time

DEADLINE = float(os.environ.get("ROUNDHOUSE_TEST_DEADLINE", "600"))


def wait_until(predicate, what: str = "the condition", timeout: float = DEADLINE):
    """Polls `predicate` until it returns something true (returned), or fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout:g} s")
