"""Checkpoints on their own (the trainer's ranks as real processes, no control plane): a resumed run repeats
the uninterrupted one's losses bit for bit at the same layout and to 1e-5 at another layout; the manifest is
the commit (checksums verified on load, a corrupt checkpoint falls back to an older one); SIGTERM makes every
rank finish its step, checkpoint and exit 4; retention keeps the last K and every M-th."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from trainers.checkpoint_format import MANIFEST, Manifest, committed_steps, retained, sha256_file, step_dir
from trainers.checkpoint_storage import RawFileReader

from tests.e2e.test_trainer import finish, losses, run_ranks, start_rank, write_spec
from orchestrator.launcher.local import free_port
from tests.support.waiting import DEADLINE

MODEL = {"layers": 4, "hidden_size": 32, "heads": 4, "seq_length": 32}
TRAINING = {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 3e-3, "seed": 7,
            "weight_decay": 0.1, "warmup_steps": 2}
SAVED_AT = 3


def train(tmp_path: Path, layout: tuple[int, int, int], checkpoints: Path, name: str,
          checkpoint: dict | None = None, training: dict | None = None,
          env: dict[str, str] | None = None) -> tuple[list[float], str]:
    tp, pp, dp = layout
    spec = write_spec(tmp_path, model=MODEL, parallelism={"tp": tp, "pp": pp, "dp": dp},
                      training=training or TRAINING, checkpoint=checkpoint or {"interval": SAVED_AT})
    run_dir = tmp_path / name
    run_dir.mkdir()
    outcomes = run_ranks(spec, run_dir, world_size=tp * pp * dp,
                         extra_env={"ROUNDHOUSE_CHECKPOINT_DIR": str(checkpoints), **(env or {})})
    for code, _, err in outcomes:
        assert code == 0, f"{name} at {layout}: {err[-3000:]}"
    return losses(outcomes[0][1]), outcomes[0][1]


def only_step(source: Path, step: int, target: Path) -> Path:
    """A checkpoint directory holding just `source`'s checkpoint of `step` (as if the run had died after it)."""
    shutil.copytree(step_dir(source, step), step_dir(target, step))
    return target


@pytest.mark.slow
@pytest.mark.parametrize(("written", "resumed"), [
    # Written at full 3D, and with the optimizer state split four ways by ZeRO-1 alone; resumed reshaped to
    # fewer ranks. Bit for bit at the same layout is checked below (the corrupt-checkpoint test's fallback,
    # the async snapshot, the earlier format) and by the offload tests: at 1x1x4 it cost four more ranks.
    pytest.param((2, 2, 2), [(1, 2, 2), (2, 1, 1)], id="from-2x2x2"),
    pytest.param((1, 1, 4), [(2, 2, 1)], id="from-1x1x4"),
])
def test_resume_repeats_the_uninterrupted_run(tmp_path, written, resumed):
    """To a relative 1e-5 at another layout (tensor parallelism sums in another order)."""
    uninterrupted, _ = train(tmp_path, written, tmp_path / "full", "full")
    assert len(uninterrupted) == TRAINING["steps"]
    manifest = Manifest.read(step_dir(tmp_path / "full", SAVED_AT))
    assert (manifest.step, manifest.layout) == (SAVED_AT, written)
    assert manifest.samples == SAVED_AT * TRAINING["global_batch_size"]
    for layout in resumed:
        name = "resume-{}x{}x{}".format(*layout)
        checkpoints = only_step(tmp_path / "full", SAVED_AT, tmp_path / f"{name}-ckpt")
        after, out = train(tmp_path, layout, checkpoints, name)
        assert f"resuming after step {SAVED_AT}" in out
        assert after == pytest.approx(uninterrupted[SAVED_AT:], rel=1e-5), layout
        assert "(reshaped)" in out


FOUR_STEPS = {**TRAINING, "steps": 4}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> tuple[list[float], Path]:
    """One rank trained 4 steps, checkpointing every 2: its losses and its checkpoints (steps 2 and 4), which
    the tests below copy before they damage them."""
    tmp = tmp_path_factory.mktemp("four-steps")
    full, _ = train(tmp, (1, 1, 1), tmp / "ckpt", "full", checkpoint={"interval": 2}, training=FOUR_STEPS)
    assert committed_steps(tmp / "ckpt") == [4, 2]
    return full, tmp / "ckpt"


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, four_steps):
    full, written = four_steps
    shutil.copytree(written, tmp_path / "ckpt")
    # Flip a byte in the middle of the newest checkpoint's shard: same size, wrong checksum.
    shard = next(step_dir(tmp_path / "ckpt", 4).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # A torn save (no manifest) at a newer step is not a checkpoint at all.
    step_dir(tmp_path / "ckpt", 6).mkdir()
    (step_dir(tmp_path / "ckpt", 6) / "__0_0.distcp").write_bytes(b"half")

    after, out = train(tmp_path, (1, 1, 1), tmp_path / "ckpt", "resumed", checkpoint={"interval": 2},
                       training={**FOUR_STEPS, "steps": 5})
    assert "checkpoint rejected: step 4" in out and "fails its SHA-256 check" in out
    assert "resuming after step 2" in out
    assert after[:2] == full[2:4]  # steps 3 and 4 again, exactly


def test_a_truncated_shard_is_rejected(tmp_path, four_steps):
    _, written = four_steps
    checkpoints = only_step(written, 2, tmp_path / "ckpt")
    shard = next(step_dir(checkpoints, 2).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    after, out = train(tmp_path, (1, 1, 1), checkpoints, "resumed", checkpoint={"interval": 2},
                       training={**TRAINING, "steps": 3})
    assert "has 100 bytes, the manifest says" in out
    assert "from the start" in out and len(after) == 3


@pytest.mark.slow
def test_an_async_snapshot_slower_than_the_next_step_still_holds_its_own_step(tmp_path):
    """An async save copies the state while the next step's forward and backward run; that step's optimizer
    waits for the copy, so the checkpoint holds the state after its own step, not the next one's."""
    layout = (1, 1, 2)
    uninterrupted, out = train(tmp_path, layout, tmp_path / "full", "full",
                               checkpoint={"interval": SAVED_AT, "async_save": True},
                               env={"RH_TEST_SNAPSHOT_DELAY": "2"})
    blocked = float(re.search(rf"^checkpoint step {SAVED_AT} blocked training ([\d.]+) s", out, re.M)[1])
    assert blocked > 1.0, "the next step's optimizer waited for the slow copy"
    checkpoints = only_step(tmp_path / "full", SAVED_AT, tmp_path / "resume-ckpt")
    after, out = train(tmp_path, layout, checkpoints, "resume")
    assert f"resuming after step {SAVED_AT}" in out and "(same layout)" in out
    assert after == uninterrupted[SAVED_AT:], "same layout: bit for bit"


@pytest.mark.slow
def test_a_checkpoint_in_the_earlier_format_still_resumes(tmp_path):
    """Checkpoints of format roundhouse-dcp-1 (DCP's own torch.save files) are read with DCP's own reader,
    so a job checkpointed before an upgrade resumes after it."""
    layout = (1, 1, 2)
    uninterrupted, _ = train(tmp_path, layout, tmp_path / "full", "full")
    current = step_dir(tmp_path / "full", SAVED_AT)
    earlier = step_dir(tmp_path / "earlier", SAVED_AT)
    stored = FileSystemReader(current).read_metadata().state_dict_metadata
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in stored.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP in one process, without torch.distributed
        dcp.load(state, storage_reader=RawFileReader(current), no_dist=True)
        dcp.save(state, storage_writer=FileSystemWriter(earlier), no_dist=True)
    files = {path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)} for path in earlier.iterdir()}
    Manifest(**{**asdict(Manifest.read(current)), "files": files, "format": "roundhouse-dcp-1"}).write(earlier)
    after, out = train(tmp_path, layout, tmp_path / "earlier", "resume-earlier")
    assert f"resuming after step {SAVED_AT}" in out
    assert after == uninterrupted[SAVED_AT:]


@pytest.mark.slow
def test_sigterm_makes_every_rank_checkpoint_its_step_and_exit_4(tmp_path):
    spec = write_spec(tmp_path, model=MODEL, parallelism={"dp": 2}, training={**TRAINING, "steps": 200},
                      checkpoint={"interval": 0})
    port = free_port()
    env = {"ROUNDHOUSE_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "RH_TEST_STEP_SLEEP": "0.2"}
    ranks = [start_rank(spec, tmp_path, rank, 2, port, extra_env=env) for rank in range(2)]
    deadline = time.monotonic() + DEADLINE
    while not (tmp_path / "ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first step has run once the trainer created the directory (at start-up)
    time.sleep(3)
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    outcomes = [finish(rank) for rank in ranks]
    assert [code for code, _, _ in outcomes] == [4, 4], outcomes[0][2][-2000:]
    trained = losses(outcomes[0][1])
    assert 0 < len(trained) < 200
    assert committed_steps(tmp_path / "ckpt") == [len(trained)]
    assert "SIGTERM: stopped after step" in outcomes[0][1]


def test_retention_keeps_the_last_k_and_every_mth():
    assert retained([2, 4, 6, 8, 10], keep_last=2, keep_every=0) == {8, 10}
    assert retained([2, 4, 6, 8, 10], keep_last=1, keep_every=4) == {4, 8, 10}


def test_retention_deletes_older_checkpoints_only_after_a_newer_commit(tmp_path):
    train(tmp_path, (1, 1, 1), tmp_path / "ckpt", "run", checkpoint={"interval": 1, "keep_last": 2,
                                                                     "keep_every": 3})
    assert committed_steps(tmp_path / "ckpt") == [6, 5, 3]
    manifest = json.loads((step_dir(tmp_path / "ckpt", 6) / MANIFEST).read_text())
    assert manifest["step"] == 6 and set(manifest["files"]) >= {".metadata"}
    for name, entry in manifest["files"].items():
        assert (step_dir(tmp_path / "ckpt", 6) / name).stat().st_size == entry["size"]
