"""What every `roundhouse` command shares: where output goes, how a command fails, exit codes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

console = Console(highlight=False)
# Messages and event lines are not wrapped at the terminal width: a log or a pipe gets them whole.
errors = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_INTERRUPTED = 130

# `roundhouse cancel` and `roundhouse sweep cancel` give up waiting for the stop after this long.
CancelTimeout = Annotated[float, typer.Option("--timeout", min=0,
                                              help="give up waiting after this many seconds (0: never)")]

Resource = TypeVar("Resource")


def poll_until(resource: Resource, read: Callable[[Resource], Resource], done: Callable[[Resource], bool],
               timeout: float, every: float) -> Resource:
    """Re-reads `resource` every `every` seconds until `done` says so or `timeout` seconds pass (0: never)."""
    deadline = time.monotonic() + timeout if timeout else float("inf")
    while not done(resource) and time.monotonic() < deadline:
        time.sleep(every)
        resource = read(resource)
    return resource


def fail(message: str, code: int = 1) -> NoReturn:
    """Prints `error: message` on stderr and exits with `code` (1: refused or unreachable; 2: bad input)."""
    errors.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)
