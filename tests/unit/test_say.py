"""A rank's output lines stay whole while several threads print (`trainers.say`): the checkpoint writer's
thread printed into the training loop's step lines and a CI run lost a step's loss line."""

from __future__ import annotations

import io
import threading

from trainers.say import say


class RecordingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


def test_a_line_and_its_newline_are_one_write_then_a_flush():
    stream = RecordingStream()
    say("step 3/6 loss 5.1 lr 1.0e-03 tok/s 812", file=stream)
    assert stream.writes == ["step 3/6 loss 5.1 lr 1.0e-03 tok/s 812\n"]
    assert stream.flushes == 1


def test_lines_from_many_threads_arrive_whole():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    threads, lines_each = 8, 500
    start = threading.Barrier(threads)

    def speak(thread: int) -> None:
        start.wait()
        for n in range(lines_each):
            say(f"thread {thread} line {n} " + "x" * 40, file=stream)

    workers = [threading.Thread(target=speak, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    written = raw.getvalue().decode().splitlines()
    assert sorted(written) == sorted(f"thread {t} line {n} " + "x" * 40
                                     for t in range(threads) for n in range(lines_each))
