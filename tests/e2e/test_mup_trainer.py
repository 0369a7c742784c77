"""µP (`model.mup`) in the trainer's ranks as real processes; the rules themselves are tests/unit/test_mup.py.

Covers: with µP on, tp=2 pp=2 trains the losses of (1,1,1) to 1e-5 (tensor parallelism splits the logits'
vocabulary and the matrices, yet every rank's multipliers come from global shapes), and the standard
parametrization trains other losses; a checkpoint records the parametrization, resumes reshaped under it and is
refused under another, naming the field. One uninterrupted µP run at (1,1,1) is the reference of both tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.checkpoint_format import Manifest, step_dir

from tests.e2e.test_checkpoint import only_step
from tests.e2e.test_trainer import losses, run_ranks, write_spec

pytestmark = pytest.mark.slow

MUP_MODEL = {"layers": 4, "hidden_size": 64, "heads": 4, "seq_length": 32, "mup": {"base_hidden_size": 32}}  # m = 2
MUP_TRAINING = {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 3e-3, "seed": 7,
                "weight_decay": 0.1, "warmup_steps": 2}
SAVED_AT = 3


def train(tmp_path: Path, layout: tuple[int, int, int], name: str, model: dict = MUP_MODEL,
          checkpoints: Path | None = None, expect_code: int = 0) -> tuple[list[float], str, str]:
    tp, pp, dp = layout
    spec = write_spec(tmp_path, model=model, parallelism={"tp": tp, "pp": pp, "dp": dp}, training=MUP_TRAINING,
                      checkpoint={"interval": SAVED_AT})
    run_dir = tmp_path / name
    run_dir.mkdir()
    env = {"ROUNDHOUSE_CHECKPOINT_DIR": str(checkpoints)} if checkpoints else {}
    outcomes = run_ranks(spec, run_dir, world_size=tp * pp * dp, extra_env=env)
    for code, _, err in outcomes:
        assert code == expect_code, f"{name} at {layout}: {err[-3000:]}"
    return losses(outcomes[0][1]), outcomes[0][1], outcomes[0][2]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[float], Path]:
    """The µP run at (1,1,1), checkpointing every SAVED_AT steps (saving changes no loss): its losses and its
    checkpoint directory."""
    tmp = tmp_path_factory.mktemp("mup-reference")
    trained, _, _ = train(tmp, (1, 1, 1), "full", checkpoints=tmp / "full-ckpt")
    assert len(trained) == MUP_TRAINING["steps"] and trained[-1] < trained[0]
    return trained, tmp / "full-ckpt"


def test_mup_trains_the_same_losses_at_another_layout(tmp_path, uninterrupted):
    """The parity test of tests/e2e/test_parallel.py with µP on."""
    reference, _ = uninterrupted
    other, _, _ = train(tmp_path, (2, 2, 1), "tp2-pp2")
    assert other == pytest.approx(reference, rel=1e-5)
    standard, _, _ = train(tmp_path, (1, 1, 1), "standard", model={**MUP_MODEL, "mup": None})
    assert standard != pytest.approx(reference, rel=1e-5)  # µP does change the run


def test_a_checkpoint_records_its_parametrization_and_resumes_only_under_it(tmp_path, uninterrupted):
    reference, written = uninterrupted
    manifest = Manifest.read(step_dir(written, SAVED_AT))
    assert manifest.parametrization == {"mup": {"base_hidden_size": 32, "base_head_dim": 8, "output_multiplier": 1.0,
                                                "attention_multiplier": 1.0, "zero_init_readout": False,
                                                "weight_decay_exponent": 1.0}}
    # Reshaped (tp=2, pp=2): µP intact, the run goes on as if uninterrupted.
    checkpoints = only_step(written, SAVED_AT, tmp_path / "reshaped-ckpt")
    after, out, _ = train(tmp_path, (2, 2, 1), "reshaped", checkpoints=checkpoints)
    assert f"resuming after step {SAVED_AT}" in out and "(reshaped)" in out
    assert after == pytest.approx(reference[SAVED_AT:], rel=1e-5)
    # Another base width: refused, naming the field. (Every other difference, µP against the standard
    # parametrization included, takes the same check: tests/unit/test_mup.py names each one's field.)
    checkpoints = only_step(written, SAVED_AT, tmp_path / "other-base-ckpt")
    _, out, err = train(tmp_path, (1, 1, 1), "other-base", model={**MUP_MODEL, "mup": {"base_hidden_size": 16}},
                        checkpoints=checkpoints, expect_code=1)
    assert "model.mup.base_hidden_size: the checkpoint was written with 32, this job has 16" in err
    assert "resuming under a different parametrization is refused" in err
    assert "step 4/" not in out
