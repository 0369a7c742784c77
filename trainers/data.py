"""Byte-level text data: the tokenizer, the corpus, and a deterministic batch sampler.

Tokens are bytes (vocab 256), so any file is text to this tokenizer and nothing needs training.

The corpus is `spec.data.path` (a file, or a directory read recursively in sorted path order) or, when that is
unset, the built-in one: this Python's standard-library sources, sorted and capped at `BUILTIN_CORPUS_BYTES`.
For validation, the corpus is cut into about a hundred equal blocks and every `VAL_EVERY`-th block is held out
(5%), so the held-out text is spread over the whole corpus rather than being whatever file happens to be last.

Sampling: the global batch of step s is `global_batch_size` random windows of seq_length+1 tokens whose starts
depend only on (seed, s). Every rank draws the same global batch and keeps its own contiguous slice of it, so
a run's batches, and therefore its losses, do not depend on how many data-parallel ranks share it."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BYTE_VOCAB = 256
BUILTIN_CORPUS_BYTES = 4 << 20
VAL_EVERY = 20  # 1 block in 20 is held out
SPLIT_BLOCKS = 100
MAX_SPLIT_BLOCK = 64 << 10
EVAL_WINDOWS = 64  # fixed held-out windows per evaluation, shared out among the data-parallel ranks
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(Exception):
    """The corpus cannot be read or is too small to sample from."""


def encode(text: str | bytes) -> torch.Tensor:
    """Bytes to tokens (uint8 to keep the corpus small; batches come out as int64)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def builtin_corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        files += [Path(directory, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(path: str | None) -> bytes:
    """The raw corpus: the file at `path`, every file under it, or the built-in corpus when `path` is unset."""
    if not path:  # None, or "" from a proto that set the field empty
        return _concatenate(builtin_corpus_files(), cap=BUILTIN_CORPUS_BYTES, origin="the built-in corpus")
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
    else:
        raise DataError(f"data.path {path!r} does not exist")
    return _concatenate(files, cap=None, origin=f"data.path {path!r}")


def _concatenate(files: list[Path], cap: int | None, origin: str) -> bytes:
    parts, size = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {f} from {origin}: {exc}") from None
        parts.append(data)
        size += len(data)
        if cap is not None and size >= cap:
            break
    corpus = b"".join(parts)[:cap]
    if not corpus:
        raise DataError(f"{origin} holds no data")
    return corpus


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor   # (B, T) int64
    targets: torch.Tensor  # (B, T) int64: inputs shifted by one


class TextData:
    """The tokenised corpus split into train and validation, and the deterministic sampler over it."""

    def __init__(self, corpus: bytes, seq_length: int, seed: int):
        tokens = encode(corpus)
        if len(tokens) < VAL_EVERY * (seq_length + 1):
            raise DataError(f"the corpus is too small: {len(tokens)} bytes, fewer than {VAL_EVERY} * (seq_length+1)"
                            f" = {VAL_EVERY * (seq_length + 1)}, enough for a held-out part a window long")
        # Blocks at least a window long, so every held-out block can be sampled from on its own.
        block = max(seq_length + 1, min(MAX_SPLIT_BLOCK, len(tokens) // SPLIT_BLOCKS))
        blocks = tokens.split(block)
        self.train = torch.cat([b for i, b in enumerate(blocks) if i % VAL_EVERY != VAL_EVERY - 1])
        self.val = torch.cat(blocks[VAL_EVERY - 1::VAL_EVERY])
        self.seq_length = seq_length
        self.seed = seed

    @classmethod
    def from_path(cls, path: str | None, seq_length: int, seed: int) -> TextData:
        return cls(load_corpus(path), seq_length, seed)

    def train_batch(self, step: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Batch:
        """This rank's contiguous share of step `step`'s global batch."""
        starts = self._starts(self.train, f"train/{step}", global_batch_size)
        share = global_batch_size // dp_size
        return self._windows(self.train, starts[dp_rank * share:(dp_rank + 1) * share])

    def val_batch(self, dp_rank: int = 0, dp_size: int = 1, windows: int = EVAL_WINDOWS) -> Batch:
        """This rank's share of the fixed held-out windows (the same at every evaluation)."""
        starts = self._starts(self.val, "val", windows)
        return self._windows(self.val, torch.tensor_split(starts, dp_size)[dp_rank])

    def _starts(self, tokens: torch.Tensor, purpose: str, count: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, purpose))
        return torch.randint(0, len(tokens) - self.seq_length, (count,), generator=generator)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        index = starts[:, None] + torch.arange(self.seq_length + 1)
        windows = tokens[index].long()
        return Batch(inputs=windows[:, :-1], targets=windows[:, 1:])


def _derive_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy in nats of the byte distribution: the loss of the best model that ignores context."""
    counts = torch.bincount(tokens.long(), minlength=BYTE_VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
