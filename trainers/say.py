"""One line of a rank's output, written whole.

The checkpoint writer and the reporter print from their own threads while the training loop prints its step
lines; `print` writes the text and its newline in two calls on a stream that has no lock of its own, so two
threads printing at once can splice one line into another (a step line then no longer reads as one) or, in
CPython's text layer, write a pending piece twice. Every line the trainer prints goes through `say`: one lock,
one write, one flush."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

_LOCK = threading.Lock()


def say(line: str, file: TextIO | None = None) -> None:
    """Writes `line` and a newline to `file` (stdout by default) in one call, flushed, under a lock all threads
    of the process share."""
    stream = sys.stdout if file is None else file
    with _LOCK:
        stream.write(line + "\n")
        stream.flush()
