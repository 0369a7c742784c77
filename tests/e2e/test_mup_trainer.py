"""µP (`model.mup`) in the trainer's ranks as real processes; the rules themselves are tests/unit/test_mup.py.

Covers: with µP on, tp=2 pp=2 trains the losses of (1,1,1) to 1e-5 (tensor parallelism splits the logits'
vocabulary and the matrices, yet every rank's multipliers come from global shapes), and the standard
parametrization trains other losses; rank 0 reports each matrix's σ_max every model.mup.sigma_every_steps
steps and at the last one, the same values at both layouts (each stage's tensor-parallel group computes its
own matrices from shards, rank 0 gathers them), and a run that never computes them trains the same losses bit
for bit; a checkpoint records the parametrization, resumes reshaped under it and is refused under another,
naming the field. One uninterrupted µP run at (1,1,1) is the reference of all three tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.spec import parse_spec
from trainers.checkpoint_format import Manifest, step_dir
from trainers.model import GPTConfig, parameter_table

from tests.e2e.test_checkpoint import only_step
from tests.e2e.test_trainer import FakeControlPlane, losses, run_ranks, serve, write_spec

pytestmark = pytest.mark.slow

MUP = {"base_hidden_size": 32, "sigma_every_steps": 4}  # m = 2; σ_max at step 4 and at the last, 6
MUP_MODEL = {"layers": 4, "hidden_size": 64, "heads": 4, "seq_length": 32, "mup": MUP}
MUP_TRAINING = {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 3e-3, "seed": 7,
                "weight_decay": 0.1, "warmup_steps": 2}
SAVED_AT = 3


class Run:
    """One run's rank-0 losses, output and stderr, and the metric points it reported."""

    def __init__(self, trained: list[float], out: str, err: str, points: list):
        self.losses, self.out, self.err, self.points = trained, out, err, points


def train(tmp_path: Path, layout: tuple[int, int, int], name: str, model: dict = MUP_MODEL,
          checkpoints: Path | None = None, expect_code: int = 0) -> Run:
    """Trains at `layout`, reporting to a stand-in control plane of its own."""
    tp, pp, dp = layout
    spec = write_spec(tmp_path, model=model, parallelism={"tp": tp, "pp": pp, "dp": dp}, training=MUP_TRAINING,
                      checkpoint={"interval": SAVED_AT})
    run_dir = tmp_path / name
    run_dir.mkdir()
    env = {"ROUNDHOUSE_CHECKPOINT_DIR": str(checkpoints)} if checkpoints else {}
    plane = FakeControlPlane()
    server, address = serve(plane)
    try:
        outcomes = run_ranks(spec, run_dir, world_size=tp * pp * dp, server=address, extra_env=env)
    finally:
        server.stop(None)
    for code, _, err in outcomes:
        assert code == expect_code, f"{name} at {layout}: {err[-3000:]}"
    return Run(losses(outcomes[0][1]), outcomes[0][1], outcomes[0][2], plane.points())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Run, Path]:
    """The µP run at (1,1,1), checkpointing every SAVED_AT steps (saving changes no loss): the run and its
    checkpoint directory."""
    tmp = tmp_path_factory.mktemp("mup-reference")
    run = train(tmp, (1, 1, 1), "full", checkpoints=tmp / "full-ckpt")
    assert len(run.losses) == MUP_TRAINING["steps"] and run.losses[-1] < run.losses[0]
    return run, tmp / "full-ckpt"


def test_mup_trains_the_same_losses_and_sigma_max_at_another_layout(tmp_path, uninterrupted):
    """The parity test of tests/e2e/test_parallel.py with µP on, and σ_max at global shapes."""
    reference, _ = uninterrupted
    other = train(tmp_path, (2, 2, 1), "tp2-pp2")
    assert other.losses == pytest.approx(reference.losses, rel=1e-5)

    matrices = [name for name, row in parameter_table(GPTConfig.from_spec(parse_spec(
        {"name": "m", "model": MUP_MODEL}).model)).items() if len(row.shape) == 2]
    assert [p.step for p in reference.points if p.sigma_max] == [4, 6]
    for point in reference.points:
        if point.sigma_max:
            assert sorted(point.sigma_max) == sorted(matrices)  # every matrix (a proto map keeps no order)
            assert all(value > 0 for value in point.sigma_max.values())
    for ours, theirs in zip(reference.points, other.points, strict=True):
        assert sorted(theirs.sigma_max) == sorted(ours.sigma_max)
        for matrix, value in ours.sigma_max.items():
            assert theirs.sigma_max[matrix] == pytest.approx(value, rel=1e-4), (ours.step, matrix)

    standard = train(tmp_path, (1, 1, 1), "standard", model={**MUP_MODEL, "mup": None})
    assert standard.losses != pytest.approx(reference.losses, rel=1e-5)  # µP does change the run


def test_computing_sigma_max_changes_no_loss(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    never = train(tmp_path, (1, 1, 1), "never", model={**MUP_MODEL, "mup": {**MUP, "sigma_every_steps": 0}},
                  checkpoints=tmp_path / "never-ckpt")  # saving as the reference does: only σ_max differs
    assert [p.loss for p in never.points] == [p.loss for p in reference.points]  # bit for bit
    assert not any(p.sigma_max for p in never.points)


def test_a_checkpoint_records_its_parametrization_and_resumes_only_under_it(tmp_path, uninterrupted):
    reference, written = uninterrupted
    manifest = Manifest.read(step_dir(written, SAVED_AT))
    assert manifest.parametrization == {"mup": {"base_hidden_size": 32, "base_head_dim": 8, "output_multiplier": 1.0,
                                                "attention_multiplier": 1.0, "zero_init_readout": False,
                                                "weight_decay_exponent": 1.0}}
    # Reshaped (tp=2, pp=2): µP intact, the run goes on as if uninterrupted.
    checkpoints = only_step(written, SAVED_AT, tmp_path / "reshaped-ckpt")
    reshaped = train(tmp_path, (2, 2, 1), "reshaped", checkpoints=checkpoints)
    assert f"resuming after step {SAVED_AT}" in reshaped.out and "(reshaped)" in reshaped.out
    assert reshaped.losses == pytest.approx(reference.losses[SAVED_AT:], rel=1e-5)
    # Another base width: refused, naming the field. (Every other difference, µP against the standard
    # parametrization included, takes the same check: tests/unit/test_mup.py names each one's field.)
    checkpoints = only_step(written, SAVED_AT, tmp_path / "other-base-ckpt")
    refused = train(tmp_path, (1, 1, 1), "other-base", model={**MUP_MODEL, "mup": {**MUP, "base_hidden_size": 16}},
                    checkpoints=checkpoints, expect_code=1)
    assert "model.mup.base_hidden_size: the checkpoint was written with 32, this job has 16" in refused.err
    assert "resuming under a different parametrization is refused" in refused.err
    assert "step 4/" not in refused.out
