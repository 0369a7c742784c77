"""DCP's storage layer for Roundhouse checkpoints: tensors as their raw bytes, hashed as they are written.

The checkpoint is still a PyTorch distributed checkpoint: DCP plans it, deduplicates replicas, writes
`.metadata` (every tensor's global name, shape, dtype and chunks) and, when loading, works out which bytes
each rank needs at its layout. Only the bytes in the files differ from DCP's FileSystemWriter, which wraps
each tensor in its own torch.save zip archive: here a tensor chunk is its C-order bytes at an offset
(`RawChunk`, kept in `.metadata`), so writing is a copy into a staging buffer and reading one `readinto`.

Why: torch.save costs a fixed amount per tensor (hundreds of tensors per rank), and the manifest's SHA-256
then had to read every file back. Here the writer threads hash the bytes in memory on their way to the disk,
and a file's digest is ready when its fsync returns (benchmarks/checkpoint.py, docs/benchmarks.md).

Read these files with `RawFileReader` (for example `dcp.load(state, storage_reader=RawFileReader(path))`);
DCP's own FileSystemReader cannot, as it expects torch.save archives."""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import hashlib
import io
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future


@dataclass(frozen=True)
class RawChunk:
    """Where one saved item's bytes lie. A tensor chunk is `shape` elements of `dtype` in C order; a byte item
    (a pickled object) has no dtype."""

    relative_path: str
    offset: int
    length: int
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's bytes, as a flat uint8 view of the same memory."""
    return tensor.detach().reshape(-1).view(torch.uint8)


class RawFileWriter(FileSystemWriter):
    """Writes each rank's items as `threads` files, one thread each, hashing every byte on its way out.

    After `dcp.save` returns, `files` maps each file this rank wrote to its size and SHA-256."""

    def __init__(self, path, threads: int):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=threads)
        self.files: dict[str, dict[str, int | str]] = {}
        self._files_lock = threading.Lock()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        buckets = balanced_buckets(plan.items, self.thread_count)
        names = [f"{plan.storage_data.prefix}{i}.distcp" for i in range(len(buckets))]
        with ThreadPoolExecutor(max_workers=len(buckets), thread_name_prefix="checkpoint-writer") as pool:
            parts = list(pool.map(lambda args: self._write_file(*args, planner), zip(names, buckets)))
        future: Future[list[WriteResult]] = Future()
        future.set_result([result for part in parts for result in part])
        return future

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        results = []
        with StagedFile(os.path.join(self.path, name)) as f:
            for item in items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    payload = data.getvalue()
                    chunk = RawChunk(name, f.size, len(payload))
                    f.write(torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None)
                else:
                    tensor = data.detach().to("cpu").contiguous()
                    chunk = RawChunk(name, f.size, tensor.numel() * tensor.element_size(), tensor.dtype,
                                     tuple(tensor.shape))
                    f.write(tensor_bytes(tensor))
                results.append(WriteResult(index=item.index, size_in_bytes=chunk.length, storage_data=chunk))
        with self._files_lock:
            self.files[name] = {"size": f.size, "sha256": f.sha256}
        return results


# O_DIRECT wants the buffer's address, the file offset and the length to be multiples of the device's
# logical block size; a page is a multiple of every common one.
DIRECT_ALIGNMENT = mmap.PAGESIZE
STAGING_BYTES = 4 << 20  # per buffer; two per file being written


class StagedFile:
    """A new file written sequentially through two aligned staging buffers: while one buffer's bytes go to
    the disk (a thread of its own, O_DIRECT), the caller fills and hashes (SHA-256) the other. Fsynced on
    close.

    O_DIRECT sends the bytes from the buffer to the device without copying them into the page cache: a
    checkpoint is written once and not read again until a restart, so caching it only evicts what training
    uses, and on virtual machines whose guest memory is backed lazily the page cache's fresh pages cost more
    than the disk (docs/benchmarks.md). Where the filesystem refuses O_DIRECT (tmpfs, some network ones), the
    same writes go through the page cache."""

    def __init__(self, path: str):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
            self.direct = hasattr(os, "O_DIRECT")
        except OSError:
            self.fd = os.open(path, flags, 0o644)
            self.direct = False
        self._buffers = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)]  # anonymous memory: page-aligned
        self._staged = [torch.frombuffer(buffer, dtype=torch.uint8) for buffer in self._buffers]
        self._current = 0
        self._filled = 0
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-disk")
        self._in_flight: concurrent.futures.Future | None = None  # the other buffer's write
        self._digest = hashlib.sha256()
        self.size = 0
        self.sha256 = ""

    def write(self, data: torch.Tensor | None) -> None:
        """Appends `data` (flat uint8); copies and hashing release the GIL, so writer threads run in parallel."""
        done, total = 0, 0 if data is None else data.numel()
        while done < total:
            take = min(total - done, STAGING_BYTES - self._filled)
            self._staged[self._current][self._filled:self._filled + take].copy_(data[done:done + take])
            self._filled += take
            done += take
            if self._filled == STAGING_BYTES:
                self._flush()
        self.size += total

    def _flush(self) -> None:
        buffer, length = self._current, self._filled
        with memoryview(self._buffers[buffer]) as view:
            self._digest.update(view[:length])
        if self.direct and length % DIRECT_ALIGNMENT:  # the file's last block: padded, truncated on close
            padded = -(-length // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
            self._staged[buffer][length:padded].zero_()
            length = padded
        self._wait_for_disk()  # the other buffer is free again, and the file's writes stay in order
        self._in_flight = self._disk.submit(self._write_out, buffer, length)
        self._current, self._filled = 1 - buffer, 0

    def _write_out(self, buffer: int, length: int) -> None:
        with memoryview(self._buffers[buffer]) as view:
            written = 0
            while written < length:
                try:
                    written += os.write(self.fd, view[written:length])
                except OSError as exc:
                    # Some filesystems accept O_DIRECT at open and refuse it at the first write: the rest of
                    # the file goes through the page cache (Linux lets F_SETFL clear the flag).
                    if not (self.direct and exc.errno == errno.EINVAL):
                        raise
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    self.direct = False

    def _wait_for_disk(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()
            self._in_flight = None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._flush()
                self._wait_for_disk()
                os.ftruncate(self.fd, self.size)
                os.fsync(self.fd)
                self.sha256 = self._digest.hexdigest()
        finally:
            self._disk.shutdown(wait=True)
            os.close(self.fd)
            self._staged.clear()
            for buffer in self._buffers:
                buffer.close()


def balanced_buckets(items: list[WriteItem], count: int) -> list[list[WriteItem]]:
    """`items` in at most `count` groups of about equal bytes (largest first into the lightest group), each
    in a fixed order so that every save of the same state writes the same files."""
    def size(item: WriteItem) -> int:
        if item.tensor_data is None:
            return 0
        return item.tensor_data.size.numel() * item.tensor_data.properties.dtype.itemsize

    buckets: list[list[WriteItem]] = [[] for _ in range(max(1, min(count, len(items))))]
    loads = [0] * len(buckets)
    for item in sorted(items, key=lambda it: (-size(it), str(it.index.fqn), tuple(it.index.offset or ()))):
        lightest = loads.index(min(loads))
        buckets[lightest].append(item)
        loads[lightest] += size(item)
    return buckets


class RawFileReader(FileSystemReader):
    """Reads what RawFileWriter wrote: each requested slice of a stored chunk, straight into its target when
    the target is the whole chunk (the same layout), else through a buffer of the chunk."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            with open(os.path.join(self.path, name), "rb") as f:
                for item in sorted(items, key=lambda it: self.storage_data[it.storage_index].offset):
                    chunk: RawChunk = self.storage_data[item.storage_index]
                    f.seek(chunk.offset)
                    if item.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(item, io.BytesIO(read_exactly(f, chunk.length, name)))
                        continue
                    target = planner.resolve_tensor(item).detach()
                    whole = (tuple(item.lengths) == chunk.shape and not any(item.storage_offsets)
                             and target.is_cpu and target.is_contiguous() and target.dtype == chunk.dtype)
                    if whole:
                        read_into(f, target, chunk, name)
                    else:
                        stored = torch.empty(chunk.shape, dtype=chunk.dtype)
                        read_into(f, stored, chunk, name)
                        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                            stored = stored.narrow(dim, start, length)
                        target.copy_(stored)
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future


def read_into(f, tensor: torch.Tensor, chunk: RawChunk, name: str) -> None:
    view = tensor_bytes(tensor).numpy()
    if view.nbytes != chunk.length:
        raise ValueError(f"{name}: chunk at {chunk.offset} has {chunk.length} bytes, its tensor {view.nbytes}")
    got = f.readinto(view)
    if got != chunk.length:
        raise ValueError(f"{name}: {got} of {chunk.length} bytes at offset {chunk.offset}: the file is short")


def read_exactly(f, length: int, name: str) -> bytes:
    data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{name}: {len(data)} of {length} bytes: the file is short")
    return data
