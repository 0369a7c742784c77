"""Tokenizers for data preparation: text in, token ids out.

A tokenizer is anything with `name`, `vocab_size`, `eod` (the end-of-document token id, or None when it has
none) and `encode(text) -> list[int]`. Two are provided:

* `ByteTokenizer`: UTF-8 bytes are the tokens (0..255), what the trainer's built-in corpus uses. Without an
  end-of-document token (the default) its vocabulary is 256, the trainer's default `model.vocab_size`; with
  `eod=True` token 256 ends every document and the vocabulary is 257.
* `HFTokenizer`: a Hugging Face `tokenizer.json`, run by the `tokenizers` package. That package is an optional
  dependency: it is imported only when an `HFTokenizer` is made.

`load_tokenizer(name)` turns the CLI's `--tokenizer` value (`bytes`, `bytes+eod`, or a path to a
tokenizer.json) into one of these.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

BYTE_VOCAB = 256
# Names an end-of-document token goes by in common tokenizer.json files, tried in this order.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|eot_id|>")


class TokenizerError(ValueError):
    """The tokenizer cannot be made (missing file, bad JSON, missing optional dependency, unknown token)."""


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def name(self) -> str:
        """Identifies the tokenizer; recorded in a prepared dataset's index."""

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id it produces (EOD included)."""

    @property
    def eod(self) -> int | None:
        """The id appended after each document, or None when the tokenizer has no such token."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens (no BOS/EOS/EOD)."""


class ByteTokenizer:
    """Bytes as tokens; optionally token 256 as end of document."""

    def __init__(self, eod: bool = False):
        self._eod = BYTE_VOCAB if eod else None

    @property
    def name(self) -> str:
        return "bytes+eod" if self._eod is not None else "bytes"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB + (self._eod is not None)

    @property
    def eod(self) -> int | None:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """The fast path for data preparation: the bytes themselves, as a uint8 array (no copy)."""
        return np.frombuffer(data, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"ByteTokenizer(eod={self._eod is not None})"


class HFTokenizer:
    """A Hugging Face `tokenizer.json`.

    The end-of-document token is `eod_token` when given (it must be in the vocabulary), else the first of
    `EOD_CANDIDATES` the vocabulary holds, else none."""

    def __init__(self, path: str | Path, eod_token: str | None = None):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise TokenizerError("the Hugging Face tokenizer needs the optional `tokenizers` package "
                                 "(pip install tokenizers)") from None
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer {self.path}: {exc.strerror or exc}") from None
        try:
            self._tokenizer = _HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 (tokenizers raises plain Exception for bad JSON)
            raise TokenizerError(f"{self.path} is not a valid tokenizer.json: {exc}") from None
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{self.path}: the tokenizer has an empty vocabulary")
        # Ids need not be dense; the vocabulary must cover the largest one.
        self._vocab_size = max(vocab.values()) + 1
        if eod_token is not None:
            if eod_token not in vocab:
                raise TokenizerError(f"{self.path}: the end-of-document token {eod_token!r} is not in the vocabulary")
            self._eod = vocab[eod_token]
        else:
            self._eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
        self.eod_token = next((t for t, i in vocab.items() if i == self._eod), None) if self._eod is not None else None
        self._name = f"hf:{self.path.name}:{hashlib.sha256(raw).hexdigest()[:12]}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int | None:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, eod={self.eod_token!r})"


def load_tokenizer(name: str) -> Tokenizer:
    """`bytes` (vocab 256, no EOD), `bytes+eod` (vocab 257, EOD 256), or a path to a tokenizer.json."""
    if name == "bytes":
        return ByteTokenizer()
    if name in ("bytes+eod", "bytes-eod"):
        return ByteTokenizer(eod=True)
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"unknown tokenizer {name!r}: use bytes, bytes+eod or the path of a tokenizer.json")
    return HFTokenizer(path)
