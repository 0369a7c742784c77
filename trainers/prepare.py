"""Text files to a prepared token dataset (`trainers.indexed_dataset`): `roundhouse-data prepare`.

Each input is a file or a directory read recursively (symbolic links to directories are not followed), files
in sorted relative-path order, inputs in the order given. Every file is one document; the tokenizer's
end-of-document token, when it has one, follows each. A file that is not UTF-8 text (it holds a NUL byte or
does not decode) is skipped and counted, as is a file that yields no tokens. Files are read one at a time, so
memory use is bounded by the largest file, not the corpus.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.data import DataError
from trainers.indexed_dataset import (
    IndexedDatasetWriter,
    data_path,
    dataset_prefix,
    index_path,
)
from trainers.tokenizer import ByteTokenizer, Tokenizer


@dataclass
class PrepareReport:
    output_prefix: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    files: int = 0            # files found under the inputs
    documents: int = 0        # files written as documents
    tokens: int = 0           # tokens written, EOD included
    bytes_read: int = 0       # bytes of every file read, skipped ones included
    skipped_undecodable: int = 0  # binary or not UTF-8
    skipped_empty: int = 0        # no tokens (an empty file, with a tokenizer without EOD)
    seconds: float = 0.0
    skipped_examples: list[Path] = field(default_factory=list)  # the first few skipped files

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def index_path(self) -> Path:
        return index_path(self.output_prefix)

    @property
    def data_path(self) -> Path:
        return data_path(self.output_prefix)


def input_files(inputs: list[Path], exclude: set[Path] = frozenset()) -> Iterator[Path]:
    """Every file under the inputs, in the documented order; raises DataError for an input that is missing."""
    for item in inputs:
        item = Path(item)
        if item.is_file():
            yield item
        elif item.is_dir():
            found = []
            for directory, subdirs, names in os.walk(item):
                found += [Path(directory, n) for n in names]
            for f in sorted(found, key=lambda f: f.relative_to(item).as_posix()):
                if f.is_file() and f.resolve() not in exclude:
                    yield f
        else:
            raise DataError(f"input {str(item)!r} is neither a file nor a directory")


def prepare(inputs: list[Path], output_prefix: Path, tokenizer: Tokenizer | None = None) -> PrepareReport:
    """Tokenises the inputs into `<output_prefix>.bin/.idx` (replacing any dataset there, atomically).
    `tokenizer` defaults to `ByteTokenizer()` (vocab 256, no EOD)."""
    tokenizer = tokenizer or ByteTokenizer()
    if not inputs:
        raise DataError("no inputs to prepare")
    prefix = dataset_prefix(output_prefix)
    started = time.perf_counter()
    eod = tokenizer.eod
    tail = np.array([eod], dtype=np.int64) if eod is not None else None
    encode_bytes = getattr(tokenizer, "encode_bytes", None)  # ByteTokenizer's shortcut: no decode/encode
    exclude = {index_path(prefix).resolve(), data_path(prefix).resolve()}
    with IndexedDatasetWriter(prefix, vocab_size=tokenizer.vocab_size, tokenizer_name=tokenizer.name) as writer:
        report = PrepareReport(output_prefix=prefix, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                               dtype=str(writer.dtype))
        for path in input_files(list(inputs), exclude):
            if ".tmp-" in path.name and path.name.startswith(prefix.name + "."):
                continue  # this writer's own temporary files, when the output lies inside an input directory
            report.files += 1
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
            report.bytes_read += len(raw)
            text = _as_text(raw)
            if text is None:
                report.skipped_undecodable += 1
                _note(report, path)
                continue
            ids = encode_bytes(raw) if encode_bytes is not None else np.asarray(tokenizer.encode(text), np.int64)
            if tail is not None:
                ids = np.concatenate([ids.astype(np.int64, copy=False), tail])
            if not len(ids):
                report.skipped_empty += 1
                continue
            writer.add_document(ids)
        report.documents, report.tokens = writer.num_documents, writer.num_tokens
        if not report.documents:
            raise DataError(f"no text found in {', '.join(map(str, inputs))} ({report.files} files, "
                            f"{report.skipped_undecodable} not UTF-8 text, {report.skipped_empty} empty)")
    report.seconds = time.perf_counter() - started
    return report


def _as_text(raw: bytes) -> str | None:
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _note(report: PrepareReport, path: Path) -> None:
    if len(report.skipped_examples) < 5:
        report.skipped_examples.append(path)
