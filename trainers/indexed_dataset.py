"""A tokenised corpus on disk, memory-mapped, and the deterministic sampler over it.

On-disk format (two files sharing a prefix; all integers little-endian):

`<prefix>.bin`: every document's tokens, concatenated, nothing else: uint16 when the vocabulary fits
(vocab_size <= 65536), else int32.

`<prefix>.idx`:

    offset  size  field
         0     8  magic b"RHTOKIDX"
         8     4  version, uint32 (1)
        12     4  token dtype code, uint32: 1 = uint16, 2 = int32
        16     8  number of documents N, uint64
        24     8  number of tokens, uint64 (the .bin holds exactly this many)
        32     4  vocab size, uint32 (every token id is below it)
        36     4  length L of the tokenizer name, uint32
        40     L  tokenizer name, UTF-8
                  zero padding to a multiple of 8
                  N+1 document offsets, int64, in tokens: document i is tokens[offsets[i]:offsets[i+1]]

The writer writes both files under temporary names, fsyncs them, removes any old `.idx`, renames the `.bin` and
then the `.idx` into place and fsyncs the directory. The `.idx` is therefore the commit mark: a dataset whose
writer died before `finalize()` has no `.idx` (only `*.tmp-*` files, which are not a dataset), and a reader
never pairs a new `.bin` with an old `.idx`.

Sampling (`TokenWindows`) works like `trainers.data.TextData`: the global batch of step s is
`global_batch_size` windows of seq_length+1 tokens whose starts depend only on (seed, s), and each
data-parallel rank keeps its contiguous slice of it. Windows may cross document boundaries (the EOD token,
when the tokenizer has one, marks them).
"""

from __future__ import annotations

import os
import secrets
import struct
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
import torch

from trainers.data import (
    EVAL_WINDOWS,
    MAX_SPLIT_BLOCK,
    SPLIT_BLOCKS,
    VAL_EVERY,
    Batch,
    DataError,
    TextData,
    _derive_seed,
)

MAGIC = b"RHTOKIDX"
VERSION = 1
_FIXED = struct.Struct("<8sIIQQII")  # magic, version, dtype code, documents, tokens, vocab size, name length
DTYPE_CODES = {np.dtype(np.uint16): 1, np.dtype(np.int32): 2}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_NAME_BYTES = 4096
# A document-level train/val split needs at least this many held-out documents; fewer, and blocks of tokens
# are held out instead (as trainers.data does), so the held-out text stays spread over the corpus.
MIN_VAL_DOCUMENTS = 5


class IndexedDatasetError(DataError):
    """The dataset is missing, corrupt, or cannot be written."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id (< vocab_size) fits, else int32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, not {vocab_size}")
    if vocab_size > np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size {vocab_size} does not fit int32 token ids")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def dataset_prefix(path: str | os.PathLike) -> Path:
    """The prefix of a dataset named by its prefix, its .idx or its .bin."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".idx", ".bin") else p


def index_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{dataset_prefix(prefix)}.idx")


def data_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{dataset_prefix(prefix)}.bin")


def _header_bytes(dtype: np.dtype, documents: int, tokens: int, vocab_size: int, name: str) -> bytes:
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        raise ValueError(f"the tokenizer name is {len(encoded)} bytes long, more than {MAX_NAME_BYTES}")
    header = _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[dtype], documents, tokens, vocab_size, len(encoded)) + encoded
    return header + b"\0" * (-len(header) % 8)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not possible everywhere (Windows); the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _abandon(file, *paths: Path) -> None:
    """Cleanup for a writer dropped without finalize() or abort()."""
    file.close()
    _remove_quietly(*paths)


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx`, one `add_document` at a time.

    Give the token `dtype`, or the `vocab_size` to choose it (and to check every token against); with neither
    the dtype is int32 and the recorded vocab size is one more than the largest token written. Nothing exists
    at the prefix until `finalize()`; `abort()` (or leaving a `with` block by an exception, or dropping the
    writer) removes the temporary files. A process killed outright leaves only `<prefix>.*.tmp-*` files."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type | str | None = None, *,
                 vocab_size: int | None = None, tokenizer_name: str = ""):
        self.prefix = dataset_prefix(prefix)
        if dtype is None:
            self.dtype = dtype_for_vocab(vocab_size) if vocab_size is not None else np.dtype(np.int32)
        else:
            self.dtype = np.dtype(dtype)
            if self.dtype not in DTYPE_CODES:
                raise ValueError(f"token dtype must be uint16 or int32, not {self.dtype}")
        self._limit = int(np.iinfo(self.dtype).max) + 1  # token ids must be below this
        if vocab_size is not None:
            if vocab_size < 1 or vocab_size > self._limit:
                raise ValueError(f"vocab_size {vocab_size} does not fit {self.dtype} tokens")
            self._limit = vocab_size
        self.vocab_size = vocab_size
        self.tokenizer_name = tokenizer_name
        _header_bytes(self.dtype, 0, 0, 1, tokenizer_name)  # reject a bad name now, not at finalize()
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f"tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._bin_tmp = Path(f"{self.prefix}.bin.{tag}")
        self._idx_tmp = Path(f"{self.prefix}.idx.{tag}")
        self._bin = open(self._bin_tmp, "xb")  # noqa: SIM115 (open until finalize or abort)
        self._cleanup = weakref.finalize(self, _abandon, self._bin, self._bin_tmp, self._idx_tmp)
        self._offsets = [0]
        self._max_token = -1
        self._state = "open"

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def add_document(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> int:
        """Appends one document; returns its index. An empty document is allowed (and kept)."""
        if self._state != "open":
            raise IndexedDatasetError(f"{self.prefix}: add_document after the writer was {self._state}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of token ids, not shape {array.shape}")
        if array.size:
            if array.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, not {array.dtype}")
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= self._limit:
                what = f"vocab_size {self.vocab_size}" if self.vocab_size is not None else f"{self.dtype}"
                raise ValueError(f"document {self.num_documents}: token ids {low}..{high} do not fit {what}")
            self._max_token = max(self._max_token, high)
            self._bin.write(array.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + int(array.size))
        return self.num_documents - 1

    def finalize(self) -> Path:
        """Makes the dataset durable and visible at the prefix, replacing any old one; returns the prefix."""
        if self._state != "open":
            raise IndexedDatasetError(f"{self.prefix}: finalize after the writer was {self._state}")
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            vocab = self.vocab_size if self.vocab_size is not None else max(self._max_token + 1, 1)
            with open(self._idx_tmp, "xb") as f:
                f.write(_header_bytes(self.dtype, self.num_documents, self.num_tokens, vocab, self.tokenizer_name))
                f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            idx, bin_ = index_path(self.prefix), data_path(self.prefix)
            _remove_quietly(idx)  # from here until the last rename there is no dataset, never a mismatched one
            os.replace(self._bin_tmp, bin_)
            os.replace(self._idx_tmp, idx)
            _fsync_directory(self.prefix.parent)
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()
        self._state = "finalized"
        return self.prefix

    def abort(self) -> None:
        """Drops what was written; nothing is left at the prefix by this writer."""
        if self._state == "finalized":
            return
        self._cleanup()  # closes the file and removes the temporary ones (once)
        self._state = "aborted"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()


class IndexedDataset:
    """A prepared dataset, memory-mapped read-only. `prefix` may also name the .idx or the .bin."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = dataset_prefix(prefix)
        self.index_path, self.data_path = index_path(self.prefix), data_path(self.prefix)
        idx, bin_ = self.index_path, self.data_path
        if not idx.is_file():
            hint = " (an unfinished dataset: its writer never finalized)" if bin_.exists() or any(
                self.prefix.parent.glob(f"{self.prefix.name}.*.tmp-*")) else ""
            raise IndexedDatasetError(f"{idx}: no such dataset index{hint}")
        if not bin_.is_file():
            raise IndexedDatasetError(f"{bin_}: the dataset's token file is missing (its index {idx} exists)")
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            fixed = f.read(_FIXED.size)
            if len(fixed) >= len(MAGIC) and fixed[:len(MAGIC)] != MAGIC:
                raise IndexedDatasetError(f"{idx}: not a token dataset index (magic bytes {fixed[:8]!r}, "
                                          f"expected {MAGIC!r})")
            if len(fixed) < _FIXED.size:
                raise IndexedDatasetError(f"{idx}: truncated: {idx_size} bytes, shorter than the "
                                          f"{_FIXED.size}-byte header")
            _, version, code, documents, tokens, vocab, name_length = _FIXED.unpack(fixed)
            if version != VERSION:
                raise IndexedDatasetError(f"{idx}: format version {version}, this reader knows version {VERSION}")
            if code not in DTYPES:
                raise IndexedDatasetError(f"{idx}: unknown token dtype code {code}")
            if name_length > MAX_NAME_BYTES:
                raise IndexedDatasetError(f"{idx}: corrupt header (tokenizer name of {name_length} bytes)")
            name = f.read(name_length)
        if len(name) < name_length:
            raise IndexedDatasetError(f"{idx}: truncated inside the header")
        try:
            self.tokenizer_name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise IndexedDatasetError(f"{idx}: corrupt header (the tokenizer name is not UTF-8)") from None
        header_length = _FIXED.size + name_length + (-(_FIXED.size + name_length) % 8)
        expected = header_length + 8 * (documents + 1)
        if idx_size != expected:
            state = "truncated" if idx_size < expected else "longer than its header says"
            raise IndexedDatasetError(f"{idx}: {state}: {idx_size} bytes, but a header for {documents} documents "
                                      f"means {expected}")
        self.dtype = DTYPES[code]
        if vocab < 1:
            raise IndexedDatasetError(f"{idx}: corrupt header (vocab size {vocab})")
        self.vocab_size = vocab
        bin_size = bin_.stat().st_size
        if bin_size != tokens * self.dtype.itemsize:
            raise IndexedDatasetError(f"{bin_}: {bin_size} bytes, but {idx} describes {tokens} {self.dtype} tokens "
                                      f"= {tokens * self.dtype.itemsize} bytes (truncated, or index and tokens "
                                      f"from different runs)")
        self.offsets = np.memmap(idx, dtype="<i8", mode="r", offset=header_length, shape=(documents + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or (documents and np.any(np.diff(self.offsets) < 0)):
            raise IndexedDatasetError(f"{idx}: document offsets are inconsistent with {bin_} ({tokens} tokens): "
                                      f"they must rise from 0 to {tokens}")
        self.tokens = (np.memmap(bin_, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(tokens,)) if tokens
                       else np.zeros(0, dtype=self.dtype))

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Document i's tokens: a read-only view into the memory map."""
        n = self.num_documents
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range: {self.prefix} holds {n}")
        i %= n
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}: {self.num_documents} documents, {self.num_tokens} tokens, "
                f"{self.dtype}, vocab {self.vocab_size}, tokenizer {self.tokenizer_name!r})")


class TokenSpans:
    """Disjoint ranges of a flat token array, seen as one sequence: `len()` is their total token count, and
    position p of the sequence is in the range whose cumulative start is the last one <= p."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        keep = ends > starts
        self._tokens = tokens
        self._starts = starts[keep].astype(np.int64)
        lengths = ends[keep].astype(np.int64) - self._starts
        self._cumulative = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) \
            else np.zeros(0, np.int64)
        self._length = int(lengths.sum())

    def __len__(self) -> int:
        return self._length

    @property
    def ranges(self) -> int:
        return len(self._starts)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at these positions of the sequence (any shape), as int64."""
        flat = positions.reshape(-1)
        span = np.searchsorted(self._cumulative, flat, side="right") - 1
        picked = self._tokens[flat - self._cumulative[span] + self._starts[span]]
        return picked.astype(np.int64).reshape(positions.shape)


class TokenWindows:
    """Train/validation split of an `IndexedDataset` and the deterministic sampler over it; a drop-in for
    `trainers.data.TextData` (the same `train_batch`/`val_batch`, and `train`/`val` with `len()` in tokens).

    Split: when the dataset has at least `MIN_VAL_DOCUMENTS * val_every` documents, every `val_every`-th
    document (the 20th, 40th, ...) is held out; otherwise the token stream is cut into about a hundred blocks
    and every `val_every`-th block is held out, as `TextData` does. Either way the held-out text is spread over
    the corpus. `split_mode` says which ("documents" or "blocks").

    Resuming: `batch(step, ...)` depends only on (seed, step) and the dataset, never on earlier calls, so a run
    resumed at step s draws exactly the batches it would have drawn. With the global batch size fixed, the
    samples consumed before step s are `s * global_batch_size` (`samples_consumed`), so "resume after n
    samples" is "resume at step n // global_batch_size"."""

    def __init__(self, dataset: IndexedDataset, seq_length: int, seed: int, val_every: int = VAL_EVERY):
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, not {seq_length}")
        if val_every < 2:
            raise ValueError(f"val_every must be at least 2, not {val_every}")
        self.dataset, self.seq_length, self.seed, self.val_every = dataset, seq_length, seed, val_every
        self.vocab_size = dataset.vocab_size
        window = seq_length + 1
        offsets = np.asarray(dataset.offsets, dtype=np.int64)
        split = None
        if dataset.num_documents >= MIN_VAL_DOCUMENTS * val_every:
            held = np.arange(val_every - 1, dataset.num_documents, val_every)
            split = self._split(offsets[held], offsets[held + 1])
            if len(split[0]) < window or len(split[1]) < window:
                split = None  # held-out documents too short for a window, say: fall back to blocks
        if split is not None:
            self.split_mode = "documents"
        else:
            total = dataset.num_tokens
            if total < val_every * window:
                raise DataError(f"the dataset {dataset.prefix} is too small: {total} tokens, fewer than "
                                f"{val_every} * (seq_length+1) = {val_every * window}, enough for a held-out part "
                                f"a window long")
            block = max(window, min(MAX_SPLIT_BLOCK, total // SPLIT_BLOCKS))
            starts = np.arange((val_every - 1) * block, total, val_every * block, dtype=np.int64)
            split = self._split(starts, np.minimum(starts + block, total))
            self.split_mode = "blocks"
        self.train, self.val = split

    def _split(self, held_starts: np.ndarray, held_ends: np.ndarray) -> tuple[TokenSpans, TokenSpans]:
        """Held-out ranges (sorted, disjoint) and their complement in the whole token stream."""
        total = np.array([self.dataset.num_tokens], dtype=np.int64)
        train = TokenSpans(self.dataset.tokens, np.concatenate([[0], held_ends]), np.concatenate([held_starts, total]))
        return train, TokenSpans(self.dataset.tokens, held_starts, held_ends)

    @classmethod
    def from_path(cls, path: str | os.PathLike, seq_length: int, seed: int) -> TokenWindows:
        return cls(IndexedDataset(path), seq_length, seed)

    @staticmethod
    def samples_consumed(step: int, global_batch_size: int) -> int:
        """Windows drawn by steps 0..step-1."""
        return step * global_batch_size

    def batch(self, step: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Batch:
        """This data-parallel rank's contiguous share of step `step`'s global batch: inputs and targets of shape
        (global_batch_size // dp_size, seq_length), int64."""
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not a rank of {dp_size}")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} does not divide among {dp_size} ranks")
        starts = self._starts(self.train, f"train/{step}", global_batch_size)
        share = global_batch_size // dp_size
        return self._windows(self.train, starts[dp_rank * share:(dp_rank + 1) * share])

    train_batch = batch  # TextData's name for it

    def val_batch(self, dp_rank: int = 0, dp_size: int = 1, windows: int = EVAL_WINDOWS) -> Batch:
        """This rank's share of the fixed held-out windows (the same at every evaluation)."""
        starts = self._starts(self.val, "val", windows)
        return self._windows(self.val, np.array_split(starts, dp_size)[dp_rank])

    def _starts(self, spans: TokenSpans, purpose: str, count: int) -> np.ndarray:
        # The same draw as TextData's: torch's generator, seeded from (seed, purpose).
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, purpose))
        return torch.randint(0, len(spans) - self.seq_length, (count,), generator=generator).numpy()

    def _windows(self, spans: TokenSpans, starts: np.ndarray) -> Batch:
        windows = torch.from_numpy(spans.gather(starts[:, None] + np.arange(self.seq_length + 1)))
        return Batch(inputs=windows[:, :-1], targets=windows[:, 1:])


def is_indexed_dataset(path: str | os.PathLike | None) -> bool:
    """Whether `path` names a prepared dataset (by .idx/.bin suffix, or a prefix with a .idx beside it)."""
    if not path:
        return False
    text = os.fspath(path)
    return text.endswith((".idx", ".bin")) or Path(text + ".idx").is_file()


def open_dataset(path: str | None, seq_length: int, seed: int, *,
                 vocab_size: int | None = None) -> TokenWindows | TextData:
    """The training data at `spec.data.path`: a `TokenWindows` over a prepared dataset when `path` is one (see
    `is_indexed_dataset`), else `TextData` over raw text (the file, directory, or built-in corpus).

    With `vocab_size` (the model's), a dataset whose tokens need a larger vocabulary is refused here, before
    an embedding lookup fails mid-run."""
    if is_indexed_dataset(path):
        data = TokenWindows(IndexedDataset(path), seq_length, seed)
        if vocab_size is not None and data.vocab_size > vocab_size:
            raise DataError(f"the dataset {data.dataset.prefix} has vocab size {data.vocab_size} "
                            f"(tokenizer {data.dataset.tokenizer_name!r}), more than model.vocab_size {vocab_size}")
        return data
    return TextData.from_path(path, seq_length, seed)
