"""`roundhouse-data`: data tools of the ranks' side, a console script of its own so that the `roundhouse`
client imports nothing that runs in a rank. `roundhouse-data prepare` tokenises text into the memory-mapped
dataset the trainer reads (trainers/prepare.py).

Exit codes: 0 ok; 1 the dataset could not be written; 2 bad input (no text, an unknown tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from trainers.data import DataError
from trainers.prepare import prepare
from trainers.tokenizer import TokenizerError, load_tokenizer

app = typer.Typer(help="Roundhouse data tools: prepare training data for the trainer.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


@app.callback()
def main() -> None:
    """Roundhouse data tools: prepare training data for the trainer."""


def _fail(message: str, code: int = 1) -> NoReturn:
    errors.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


@app.command("prepare")
def prepare_command(
    inputs: Annotated[list[Path], typer.Argument(help="text files, or directories read recursively",
                                                 metavar="INPUT", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="dataset prefix: writes PREFIX.bin and "
                                                                  "PREFIX.idx", metavar="PREFIX",
                                                    show_default=False)],
    tokenizer: Annotated[str, typer.Option(help="bytes (vocab 256), bytes+eod (vocab 257), or the path of a "
                                                "Hugging Face tokenizer.json")] = "bytes",
) -> None:
    """Tokenise text files into a dataset the trainer reads (set data.path to PREFIX.idx)."""
    try:
        tok = load_tokenizer(tokenizer)
    except TokenizerError as exc:
        _fail(str(exc), 2)
    try:
        report = prepare(inputs, output, tok)
    except DataError as exc:
        _fail(str(exc), 2)
    except (OSError, ValueError) as exc:
        _fail(f"cannot prepare {output}: {exc}")
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in (
        ("dataset", f"{report.index_path} + {report.data_path.name}"),
        ("tokenizer", f"{report.tokenizer} (vocab {report.vocab_size:,}, {report.dtype})"),
        ("files", f"{report.files:,}"),
        ("documents", f"{report.documents:,}"),
        ("tokens", f"{report.tokens:,}"),
        ("bytes read", f"{report.bytes_read:,}"),
        ("skipped", f"{report.skipped_undecodable:,} not UTF-8 text, {report.skipped_empty:,} empty"),
        ("time", f"{report.seconds:.2f} s ({report.tokens_per_second:,.0f} tokens/s)"),
    ):
        table.add_row(key, value)
    console.print(table)
    for path in report.skipped_examples:
        console.print(f"[dim]skipped {escape(str(path))}[/dim]")


if __name__ == "__main__":
    app()
