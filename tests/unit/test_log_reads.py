"""Reading a rank's log in bounded pieces from an offset or its tail (orchestrator/launcher/logs.py): a file
that seeks and a stream read through once agree on where a tail starts."""

from __future__ import annotations

import pytest

from orchestrator.launcher.logs import LOG_READ_BYTES, LogRange, read_log_file, tail_start

LOGS = [b"", b"one line, no newline", b"a\n", b"a\nb\nc\n", b"a\nb\nc", b"\n\n\n", b"x" * 100_000 + b"\nlast\n",
        b"".join(b"line %d\n" % i for i in range(40_000))]


def _read(path, where: LogRange) -> bytes:
    reads = list(read_log_file(path, follow=False, attempt_ended=lambda: True, where=where))
    assert all(0 < len(r.data) <= LOG_READ_BYTES for r in reads)
    assert all(later.offset == earlier.offset + len(earlier.data) for earlier, later in zip(reads, reads[1:]))
    return b"".join(r.data for r in reads)


def _last_lines(data: bytes, n: int) -> bytes:
    return b"".join(data.splitlines(keepends=True)[-n:])


@pytest.mark.parametrize("data", LOGS)
@pytest.mark.parametrize("lines", [1, 2, 5, 30_000])
def test_a_line_tail_is_the_last_lines_from_a_file_and_from_a_stream(tmp_path, data, lines):
    path = tmp_path / "rank-0.log"
    path.write_bytes(data)
    assert _read(path, LogRange(tail_lines=lines)) == _last_lines(data, lines)
    chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    assert data[tail_start(chunks, LogRange(tail_lines=lines)):] == _last_lines(data, lines)


@pytest.mark.parametrize("data", LOGS)
def test_an_offset_or_a_byte_tail(tmp_path, data):
    path = tmp_path / "rank-0.log"
    path.write_bytes(data)
    assert _read(path, LogRange()) == data
    assert _read(path, LogRange(offset=3)) == data[3:]
    assert _read(path, LogRange(offset=len(data) + 10)) == b""
    assert _read(path, LogRange(tail_bytes=70_000)) == data[-70_000:]
    assert data[tail_start([data], LogRange(tail_bytes=5)):] == data[-5:]


def test_following_yields_empty_reads_until_the_attempt_ends_and_never_waits(tmp_path):
    path = tmp_path / "rank-0.log"
    ended = False
    reads = read_log_file(path, follow=True, attempt_ended=lambda: ended)
    assert next(reads).data == b""  # no file yet
    path.write_bytes(b"hello\n")
    assert next(reads).data == b"hello\n"
    assert next(reads).data == b""  # nothing new
    with open(path, "ab") as f:
        f.write(b"bye\n")
    ended = True
    first = next(reads)
    assert (first.offset, first.data) == (6, b"bye\n")
    assert list(reads) == []
