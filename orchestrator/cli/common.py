"""What every `roundhouse` command shares: where output goes, how a command fails, exit codes."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

console = Console(highlight=False)
# Messages and event lines are not wrapped at the terminal width: a log or a pipe gets them whole.
errors = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_INTERRUPTED = 130


def fail(message: str, code: int = 1) -> NoReturn:
    """Prints `error: message` on stderr and exits with `code` (1: refused or unreachable; 2: bad input)."""
    errors.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)
