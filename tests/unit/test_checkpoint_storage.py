"""The checkpoint's storage layer on its own (one process, no ranks): what RawFileWriter writes, RawFileReader
reads back exactly; the digests it reports are those of the files on disk; files are not padded; and a
filesystem that refuses O_DIRECT gets the same files through the page cache."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainers import checkpoint_storage
from trainers.checkpoint_storage import RawFileReader, RawFileWriter, StagedFile


def state() -> dict[str, object]:
    generator = torch.Generator().manual_seed(3)
    return {
        "big": torch.randn(301, 257, generator=generator),  # spans several staging buffers (see the fixture)
        "bf16": torch.randn(5, 7, generator=generator).to(torch.bfloat16),  # an odd number of bytes
        "step": torch.tensor(41.0),  # zero-dimensional
        "ints": torch.arange(10, dtype=torch.int64),
        "extra": {"note": "not a tensor", "values": [1, 2, 3]},  # DCP pickles these: byte items
    }


def empty_like(saved: dict[str, object]) -> dict[str, object]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else dict.fromkeys(v) for k, v in saved.items()}


@pytest.fixture(autouse=True)
def small_staging(monkeypatch):
    monkeypatch.setattr(checkpoint_storage, "STAGING_BYTES", 64 << 10)


def save(directory, saved) -> RawFileWriter:
    writer = RawFileWriter(directory, threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... save in a single process"
        dcp.save(saved, storage_writer=writer, no_dist=True)
    return writer


def load(directory, target) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=RawFileReader(directory), no_dist=True)


def assert_same(loaded: dict[str, object], saved: dict[str, object]) -> None:
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype, key
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key


def test_what_is_written_reads_back_exactly(tmp_path):
    saved = state()
    save(tmp_path, saved)
    loaded = empty_like(saved)
    load(tmp_path, loaded)
    assert_same(loaded, saved)


def test_the_reported_digests_and_sizes_are_those_of_the_files(tmp_path):
    saved = state()
    writer = save(tmp_path, saved)
    tensor_bytes = sum(v.numel() * v.element_size() for v in saved.values() if isinstance(v, torch.Tensor))
    assert sorted(writer.files) == ["__0_0.distcp", "__0_1.distcp"]  # one file per writer thread
    for name, described in writer.files.items():
        data = (tmp_path / name).read_bytes()
        assert described == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # Raw bytes, no padding: the files hold the tensors' bytes and the two pickled items, nothing more.
    pickled = sum(f["size"] for f in writer.files.values()) - tensor_bytes
    assert 0 < pickled < 4096


def test_a_filesystem_without_o_direct_gets_the_same_files(tmp_path, monkeypatch):
    real_open = os.open
    direct = getattr(os, "O_DIRECT", 0)

    def refuse_direct(path, flags, *args):
        if direct and flags & direct:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    saved = state()
    direct_files = save(tmp_path / "direct", saved).files
    monkeypatch.setattr(os, "open", refuse_direct)
    with StagedFile(str(tmp_path / "probe")) as probe:
        assert not probe.direct
    buffered_files = save(tmp_path / "buffered", saved).files
    assert buffered_files == direct_files  # the same bytes, whichever way they went
    loaded = empty_like(saved)
    load(tmp_path / "buffered", loaded)
    assert_same(loaded, saved)


def test_a_filesystem_that_refuses_o_direct_at_the_first_write_gets_the_same_files(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_write = os.write

    def refuse_direct_writes(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    saved = state()
    direct_files = save(tmp_path / "direct", saved).files
    monkeypatch.setattr(os, "write", refuse_direct_writes)
    fallen_back = save(tmp_path / "fallen-back", saved).files
    assert fallen_back == direct_files
    loaded = empty_like(saved)
    load(tmp_path / "fallen-back", loaded)
    assert_same(loaded, saved)
