"""Prepared token datasets: the on-disk format, its writer and reader, the sampler, `roundhouse-data prepare`,
and the tokenizers."""

from __future__ import annotations

import gc
import struct
from itertools import pairwise

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trainers.prepare_cli import app
from trainers.data import DataError, TextData, builtin_corpus_files
from trainers.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    TokenWindows,
    dtype_for_vocab,
    open_dataset,
)
from trainers.prepare import prepare
from trainers.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    load_tokenizer,
)

runner = CliRunner()


def write(prefix, documents, **kwargs):
    with IndexedDatasetWriter(prefix, **kwargs) as writer:
        for doc in documents:
            writer.add_document(doc)
    return IndexedDataset(prefix)


def random_documents(rng, count, vocab, max_length=300):
    return [rng.integers(0, vocab, size=int(rng.integers(0, max_length))) for _ in range(count)]


def positional_dataset(tmp_path, n_tokens, documents=1):
    """Token value = its position in the flat stream, so a batch says exactly where it was read from."""
    bounds = np.linspace(0, n_tokens, documents + 1).astype(int)
    tokens = np.arange(n_tokens)
    return write(tmp_path / "pos", [tokens[a:b] for a, b in pairwise(bounds)], vocab_size=n_tokens)


# -- format ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [257, 65536, 100_000])
def test_round_trip_is_exact_and_picks_the_dtype(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 40, vocab) + [np.array([], dtype=np.int64), [vocab - 1, 0]]
    ds = write(tmp_path / "corpus", docs, vocab_size=vocab, tokenizer_name="test-tok")
    assert ds.dtype == (np.uint16 if vocab <= 65536 else np.int32)
    assert ds.num_documents == len(ds) == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.vocab_size == vocab and ds.tokenizer_name == "test-tok"
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(i), doc)
    np.testing.assert_array_equal(ds.tokens, np.concatenate([np.asarray(d, np.int64) for d in docs]))
    np.testing.assert_array_equal(ds.document(-1), docs[-1])
    with pytest.raises(IndexError):
        ds.document(len(docs))
    # The .idx and the .bin name the same dataset as the prefix does.
    assert IndexedDataset(tmp_path / "corpus.idx").num_tokens == IndexedDataset(f"{tmp_path}/corpus.bin").num_tokens


def test_dtype_choice_and_token_checks(tmp_path):
    assert dtype_for_vocab(256) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32
    with IndexedDatasetWriter(tmp_path / "a", vocab_size=300) as writer:
        with pytest.raises(ValueError, match="do not fit vocab_size 300"):
            writer.add_document([1, 300])
        with pytest.raises(ValueError, match="do not fit"):
            writer.add_document([-1])
        writer.add_document(torch.tensor([299, 0]))
    assert IndexedDataset(tmp_path / "a").document(0).tolist() == [299, 0]
    # Without a vocab size the recorded one is the largest token + 1.
    assert write(tmp_path / "b", [[5, 7000]], dtype=np.uint16).vocab_size == 7001
    with pytest.raises(ValueError, match="uint16 or int32"):
        IndexedDatasetWriter(tmp_path / "c", np.int64)


def test_corrupt_and_truncated_files_are_named_in_the_error(tmp_path):
    write(tmp_path / "good", [[1, 2, 3], [4, 5]], vocab_size=256)
    idx, bin_ = (tmp_path / "good.idx").read_bytes(), (tmp_path / "good.bin").read_bytes()

    def broken(name, idx_bytes, bin_bytes=bin_):
        (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        return tmp_path / name

    with pytest.raises(IndexedDatasetError, match=r"magic\.idx.*not a token dataset index"):
        IndexedDataset(broken("magic", b"NOTMAGIC" + idx[8:]))
    with pytest.raises(IndexedDatasetError, match=r"short\.idx.*truncated.*header"):
        IndexedDataset(broken("short", idx[:20]))
    with pytest.raises(IndexedDatasetError, match=r"cut\.idx.*truncated"):
        IndexedDataset(broken("cut", idx[:-4]))
    with pytest.raises(IndexedDatasetError, match=r"bintrunc\.bin.*bytes"):
        IndexedDataset(broken("bintrunc", idx, bin_[:-2]))
    with pytest.raises(IndexedDatasetError, match=r"version 9"):
        IndexedDataset(broken("version", idx[:8] + struct.pack("<I", 9) + idx[12:]))
    assert np.frombuffer(idx[-24:], "<i8").tolist() == [0, 3, 5]  # the offsets end the index
    for name, offsets in [("falling", [0, 6, 5]), ("ends", [0, 3, 4]), ("nonzero", [1, 3, 5])]:
        with pytest.raises(IndexedDatasetError, match=rf"{name}\.idx: document offsets are inconsistent"):
            IndexedDataset(broken(name, idx[:-24] + np.array(offsets, "<i8").tobytes()))
    with pytest.raises(IndexedDatasetError, match=r"nothing\.idx: no such dataset"):
        IndexedDataset(tmp_path / "nothing")
    (tmp_path / "nobin.idx").write_bytes(idx)
    with pytest.raises(IndexedDatasetError, match=r"nobin\.bin.*missing"):
        IndexedDataset(tmp_path / "nobin")


def test_an_unfinished_writer_leaves_no_dataset(tmp_path):
    prefix = tmp_path / "ds"
    writer = IndexedDatasetWriter(prefix, vocab_size=256)
    writer.add_document([1, 2, 3])
    assert not (tmp_path / "ds.idx").exists() and not (tmp_path / "ds.bin").exists()
    with pytest.raises(IndexedDatasetError, match="never finalized"):
        IndexedDataset(prefix)
    del writer
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # a dropped writer cleans up its temporary files

    # An exception inside `with` aborts, and leaves an older dataset at the prefix untouched.
    write(prefix, [[7, 8]], vocab_size=256)
    with pytest.raises(RuntimeError), IndexedDatasetWriter(prefix, vocab_size=256) as w:
        w.add_document([1] * 100)
        raise RuntimeError("killed")
    assert IndexedDataset(prefix).document(0).tolist() == [7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


# -- sampler ---------------------------------------------------------------------------------------------------

def test_batches_depend_only_on_seed_and_step(tmp_path):
    ds = write(tmp_path / "r", random_documents(np.random.default_rng(1), 200, 1000), vocab_size=1000)
    a, b = TokenWindows(ds, 16, seed=7), TokenWindows(ds, 16, seed=7)
    later = a.batch(5, 8)
    first = a.batch(3, 8)
    assert torch.equal(first.inputs, b.train_batch(3, 8).inputs)  # call order and instance do not matter
    assert torch.equal(later.inputs, b.batch(5, 8).inputs)
    assert not torch.equal(first.inputs, later.inputs)
    assert not torch.equal(first.inputs, TokenWindows(ds, 16, seed=8).batch(3, 8).inputs)
    assert first.inputs.dtype == first.targets.dtype == torch.int64 and first.inputs.shape == (8, 16)
    assert torch.equal(first.inputs[:, 1:], first.targets[:, :-1])
    # Data-parallel shares are contiguous slices of the global batch.
    shares = [a.batch(3, 8, rank, 4) for rank in range(4)]
    assert all(s.inputs.shape == (2, 16) for s in shares)
    assert torch.equal(torch.cat([s.inputs for s in shares]), first.inputs)
    assert torch.equal(torch.cat([s.targets for s in shares]), first.targets)
    val = [a.val_batch(rank, 3, windows=10) for rank in range(3)]
    assert torch.equal(torch.cat([v.inputs for v in val]), a.val_batch(windows=10).inputs)
    assert torch.equal(a.val_batch().inputs, b.val_batch().inputs)
    assert a.samples_consumed(5, 8) == 40
    with pytest.raises(ValueError, match="does not divide"):
        a.batch(0, 8, 0, 3)


def test_documents_split_is_disjoint_and_spread(tmp_path):
    # Document i is made of the token i: every token says which document it came from.
    docs = [np.full(50 + i % 7, i) for i in range(400)]
    data = TokenWindows(write(tmp_path / "docs", docs, vocab_size=400), 8, seed=3)
    assert data.split_mode == "documents"
    assert len(data.val) == sum(len(d) for i, d in enumerate(docs) if i % 20 == 19)
    assert len(data.train) + len(data.val) == data.dataset.num_tokens
    train = torch.cat([data.batch(s, 16).inputs.flatten() for s in range(50)])
    val = data.val_batch(windows=64).inputs.flatten()
    assert not (train % 20 == 19).any()
    assert (val % 20 == 19).all()
    assert val.max() - val.min() > 200  # held out over the whole corpus, not one end of it


def test_blocks_split_for_few_documents_is_disjoint_and_reads_the_right_tokens(tmp_path):
    data = TokenWindows(positional_dataset(tmp_path, 50_000, documents=3), 32, seed=0)
    assert data.split_mode == "blocks"
    block = 50_000 // 100
    for batch, held_out in [(data.batch(s, 32), False) for s in range(20)] + [(data.val_batch(), True)]:
        windows = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
        assert ((windows // block % 20 == 19) == held_out).all()
        steps = windows.diff(dim=1)
        # Consecutive tokens of the stream, except where a window jumps over the other split's block(s).
        jump = 19 * block + 1 if held_out else block + 1
        assert ((steps == 1) | (steps == jump)).all()
    assert abs(len(data.val) / 50_000 - 0.05) < 0.01


def test_too_small_a_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="too small"):
        TokenWindows(positional_dataset(tmp_path, 100), 8, seed=0)


# -- prepare and the CLI ---------------------------------------------------------------------------------------

def test_cli_prepares_a_directory_the_trainer_can_read(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts = {"b.txt": "second file " * 300, "a.txt": "first file, ünïcode " * 300, "sub/c.md": "# third\n" * 500}
    for name, text in texts.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "blob.bin").write_bytes(bytes(range(256)) * 4)  # binary: skipped
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    (src / "empty.txt").write_text("")
    prefix = tmp_path / "out" / "corpus"

    result = runner.invoke(app, ["prepare", str(src), "--output", str(prefix)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for expected in ("documents   3", "skipped     2 not UTF-8 text, 1 empty", "bytes (vocab 256, uint16)"):
        assert expected in result.output

    ds = IndexedDataset(prefix)
    assert ds.tokenizer_name == "bytes" and ds.vocab_size == 256
    # One document per file, in sorted relative-path order.
    for i, name in enumerate(["a.txt", "b.txt", "sub/c.md"]):
        assert bytes(ds.document(i).astype(np.uint8)) == texts[name].encode("utf-8")

    data = open_dataset(str(prefix), seq_length=16, seed=1, vocab_size=256)
    assert isinstance(data, TokenWindows)
    batch = data.train_batch(0, 4, 0, 1)
    assert batch.inputs.shape == (4, 16) and int(batch.inputs.max()) < 256
    assert len(data.train) + len(data.val) == ds.num_tokens


def test_cli_prepares_the_builtin_corpus_with_eod(tmp_path):
    files = builtin_corpus_files()[:50]
    prefix = tmp_path / "stdlib"
    result = runner.invoke(app, ["prepare", *map(str, files), "-o", str(prefix), "--tokenizer", "bytes+eod"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ds = IndexedDataset(prefix)
    assert ds.num_documents == 50 and ds.vocab_size == 257 and ds.tokenizer_name == "bytes+eod"
    assert int((ds.tokens == 256).sum()) == 50 and all(ds.document(i)[-1] == 256 for i in range(50))
    assert ds.num_tokens == sum(f.stat().st_size for f in files) + 50

    data = open_dataset(f"{prefix}.idx", seq_length=64, seed=1234, vocab_size=257)
    assert data.split_mode == "blocks"  # 50 documents: too few to hold out whole ones
    for step in range(3):
        batch = data.train_batch(step, 8, 1, 2)
        assert batch.inputs.shape == (4, 64) and 0 <= int(batch.inputs.min()) and int(batch.inputs.max()) < 257
    with pytest.raises(DataError, match="vocab size 257.*model.vocab_size 256"):
        open_dataset(str(prefix), 64, 1234, vocab_size=256)


def test_cli_refuses_bad_inputs(tmp_path):
    missing = runner.invoke(app, ["prepare", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "neither a file nor a directory" in missing.output
    (tmp_path / "t.txt").write_text("hello")
    bad_tok = runner.invoke(app, ["prepare", str(tmp_path / "t.txt"), "-o", str(tmp_path / "x"),
                                  "--tokenizer", "gpt9"])
    assert bad_tok.exit_code == 2 and "unknown tokenizer" in bad_tok.output
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "z").write_bytes(b"\0\1\2")
    nothing = runner.invoke(app, ["prepare", str(tmp_path / "bin"), "-o", str(tmp_path / "x")])
    assert nothing.exit_code == 2 and "no text found" in nothing.output
    assert not any(p.name.startswith("x.") for p in tmp_path.iterdir())


def test_open_dataset_falls_back_to_raw_text(tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("some plain text for the byte-level corpus. " * 200)
    data = open_dataset(str(text), seq_length=16, seed=0)
    assert isinstance(data, TextData)
    assert data.train_batch(0, 4).inputs.shape == (4, 16)


# -- tokenizers ------------------------------------------------------------------------------------------------

def test_byte_tokenizer():
    plain, with_eod = ByteTokenizer(), ByteTokenizer(eod=True)
    assert (plain.vocab_size, plain.eod, plain.name) == (256, None, "bytes")
    assert (with_eod.vocab_size, with_eod.eod, with_eod.name) == (257, 256, "bytes+eod")
    assert plain.encode("aé") == [97, 0xC3, 0xA9]
    assert load_tokenizer("bytes").eod is None and load_tokenizer("bytes+eod").eod == 256


def test_hf_tokenizer_trained_here(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
              "how vexingly quick daft zebras jump"] * 20
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    tok = HFTokenizer(path)
    assert tok.eod == hf.token_to_id("<|endoftext|>") and tok.eod_token == "<|endoftext|>"
    assert tok.vocab_size == hf.get_vocab_size() and tok.name.startswith("hf:tokenizer.json:")
    ids = tok.encode("the quick zebra")
    assert ids and max(ids) < tok.vocab_size and tok.eod not in ids
    assert hf.decode(ids) == "the quick zebra"
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)  # a directory holding tokenizer.json

    src = tmp_path / "src"
    src.mkdir()
    for i, line in enumerate(corpus[:3]):
        (src / f"{i}.txt").write_text(line * 30)
    result = runner.invoke(app, ["prepare", str(src), "-o", str(tmp_path / "bpe"), "--tokenizer", str(path)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ds = IndexedDataset(tmp_path / "bpe")
    assert ds.tokenizer_name == tok.name and ds.vocab_size == tok.vocab_size and ds.dtype == np.uint16
    assert ds.document(1).tolist() == tok.encode(corpus[1] * 30) + [tok.eod]

    report = prepare([src], tmp_path / "bpe2", tok)
    assert (report.documents, report.tokens) == (3, ds.num_tokens)

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="broken.json"):
        HFTokenizer(tmp_path / "broken.json")
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        HFTokenizer(path, eod_token="<nope>")
