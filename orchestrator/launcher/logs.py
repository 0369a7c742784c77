"""Reading a rank's log in bounded pieces, from an offset or from its tail: what every launcher's `logs`
yields, and the reading of a log that is a file (the local launcher's; any launcher with files may use it).

A launcher's `logs` never waits: following a log, it yields an empty read when nothing new is there yet,
and the caller (the StreamLogs servicer, on its event loop) waits a moment before asking again, so a
followed log holds no thread while it is quiet."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The most bytes of log in one read (and so in one StreamLogs message).
LOG_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class LogRange:
    """Where to start reading: at `offset` (a byte of the log), or at the start of its last `tail_bytes` bytes
    or last `tail_lines` lines (0: not asked). A tail, when asked, wins over the offset."""

    offset: int = 0
    tail_bytes: int = 0
    tail_lines: int = 0


@dataclass(frozen=True)
class LogRead:
    offset: int  # where `data` starts in the log
    data: bytes  # at most LOG_READ_BYTES; empty: nothing new yet (only while following)


def start_of(f, size: int, where: LogRange) -> int:
    """The byte of an open, seekable log of `size` bytes that reading starts at."""
    if where.tail_bytes:
        return max(0, size - where.tail_bytes)
    if where.tail_lines:
        return _start_of_last_lines(f, size, where.tail_lines)
    return min(where.offset, size)


def _start_of_last_lines(f, size: int, lines: int) -> int:
    """Scans back from the end, a block at a time, for the newline before the last `lines` lines."""
    end = size
    if size:
        f.seek(size - 1)
        if f.read(1) == b"\n":  # a final newline ends the last line; it does not begin another
            end = size - 1
    found = 0
    position = end
    while position > 0:
        block_start = max(0, position - LOG_READ_BYTES)
        f.seek(block_start)
        block = f.read(position - block_start)
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            found += 1
            if found == lines:
                return block_start + index + 1
        position = block_start
    return 0


def tail_start(chunks: Iterable[bytes], where: LogRange) -> int:
    """The byte a tail starts at, for a log that can only be read through from its start (once)."""
    size = 0
    newlines: deque[int] = deque(maxlen=where.tail_lines + 1)  # where the last lines end
    for chunk in chunks:
        if where.tail_lines:
            index = chunk.find(b"\n")
            while index >= 0:
                newlines.append(size + index)
                index = chunk.find(b"\n", index + 1)
        size += len(chunk)
    if where.tail_bytes:
        return max(0, size - where.tail_bytes)
    if not where.tail_lines:
        return min(where.offset, size)
    if newlines and newlines[-1] == size - 1:  # a final newline ends the last line; it does not begin another
        newlines.pop()
    return newlines[-where.tail_lines] + 1 if len(newlines) >= where.tail_lines else 0


def read_log_file(path: Path, follow: bool, attempt_ended: Callable[[], bool],
                  where: LogRange = LogRange()) -> Iterator[LogRead]:
    """A log file in pieces of at most LOG_READ_BYTES from where it was asked; with follow, until the
    attempt has ended and the whole file is read (empty reads while nothing new is there)."""
    position: int | None = None
    while True:
        ended = attempt_ended()  # asked before the file is read, so nothing written after is missed
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            f = None
        if f is not None:
            with f:
                size = os.fstat(f.fileno()).st_size
                if position is None:
                    position = start_of(f, size, where)
                f.seek(position)
                while position < size:
                    data = f.read(min(LOG_READ_BYTES, size - position))
                    if not data:
                        break
                    yield LogRead(position, data)
                    position += len(data)
        if not follow or ended:
            return
        yield LogRead(position or 0, b"")
