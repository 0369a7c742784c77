"""One deadline for every wait on a condition in the tests.

Tests wait for facts (a job's state, a file, a process gone), never for a time. On an idle machine each wait
ends in seconds; the deadline only bounds a wait on a stalled or overloaded one, so it is generous and set
once: ROUNDHOUSE_TEST_DEADLINE seconds (default 600)."""

from __future__ import annotations

import os

DEADLINE = float(os.environ.get("ROUNDHOUSE_TEST_DEADLINE", "600"))
