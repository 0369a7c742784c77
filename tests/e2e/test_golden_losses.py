"""Golden losses: the trainer's per-step losses at layouts (1, 1, 1) and (2, 2, 2), recorded on the code before
issue 12's trainer changes (the parameter table, optimizer groups from it, the optimizer-state adapter, the
explicit snapshot wait) and required since to the last bit the machine allows: those changes move code, they
must not move a training run.

The run is small (4 layers, hidden 32, 5 steps) and has weight decay, so a parameter put in the wrong decay
group changes the losses from step 2 on. Each loss is printed with 9 significant digits, which identify a
float32 exactly; the recorded values are those float32s in `float.hex`. Every rank runs one thread
(OMP_NUM_THREADS=1), so the sums inside a matrix product do not depend on the machine's core count, and the
kernels are pinned to ATen's scalar ones (ATEN_CPU_CAPABILITY=default) and MKL's conditional numerical
reproducibility mode (MKL_CBWR=COMPATIBLE). Even so, x86 CPUs have been seen to round a loss one float32 unit
apart: without the pins an AMD EPYC with AVX-512 and the CI machine of 2026-12-02 differed at step 3; with them,
an AVX2-only EPYC (family 25, 2026-12-03) still gave step 3 of (1, 1, 1) one unit above the recorded value.
So each loss must be the recorded float32 or its neighbour, and a second test shows what that tolerance
still catches: the same run without weight decay is tens to hundreds of units away from step 2 on.

If this fails after an upgrade of torch, DeepSpeed or megatron-core, check that the run still trains the same to 1e-5 (tests/e2e/test_parallel.py) before
recording new values; after a change to the trainer alone, a failure is a bug."""

from __future__ import annotations

import struct

import pytest

from tests.e2e.test_trainer import losses, run_ranks, write_spec

pytestmark = pytest.mark.slow

MODEL = {"layers": 4, "hidden_size": 32, "heads": 4, "seq_length": 32}
TRAINING = {"steps": 5, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 3e-3,
            "warmup_steps": 2, "weight_decay": 0.1, "seed": 7}

# Kernels that round the same on any x86 CPU (see the module docstring).
SAME_ROUNDING_ON_EVERY_CPU = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}

GOLDEN = {
    (1, 1, 1): ["0x1.6156c00000000p+2", "0x1.58c2a40000000p+2", "0x1.5347c60000000p+2", "0x1.4ea8cc0000000p+2",
                "0x1.43a3200000000p+2"],
    (2, 2, 2): ["0x1.6156c00000000p+2", "0x1.58c2a40000000p+2", "0x1.5347c80000000p+2", "0x1.4ea8ce0000000p+2",
                "0x1.43a3200000000p+2"],
}


def as_float32(value: float) -> float:
    """The float32 nearest to `value` (a printed loss), as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


def units_apart(a: float, b: float) -> int:
    """How many float32 steps lie between two float32 values of the same sign (losses are positive)."""
    return abs(struct.unpack("<i", struct.pack("<f", a))[0] - struct.unpack("<i", struct.pack("<f", b))[0])


def trained_losses(tmp_path, layout, training) -> list[float]:
    tp, pp, dp = layout
    spec = write_spec(tmp_path, model=MODEL, parallelism={"tp": tp, "pp": pp, "dp": dp}, training=training)
    outcomes = run_ranks(spec, tmp_path, world_size=tp * pp * dp, extra_env=SAME_ROUNDING_ON_EVERY_CPU)
    for code, _, err in outcomes:
        assert code == 0, err[-3000:]
    return [as_float32(loss) for loss in losses(outcomes[0][1])]


@pytest.mark.parametrize("layout", list(GOLDEN), ids=lambda layout: "x".join(map(str, layout)))
def test_losses_are_the_recorded_float32s_to_one_unit(tmp_path, layout):
    trained = trained_losses(tmp_path, layout, TRAINING)
    recorded = [float.fromhex(value) for value in GOLDEN[layout]]
    assert len(trained) == len(recorded)
    apart = [units_apart(t, r) for t, r in zip(trained, recorded)]
    assert max(apart) <= 1, f"units apart per step: {apart}; trained {[t.hex() for t in trained]}"


def test_the_tolerance_still_tells_a_run_without_weight_decay_apart(tmp_path):
    """What a parameter in the wrong decay group would do, at its extreme: every loss from step 2 on moves by
    far more than the one unit the test above allows."""
    trained = trained_losses(tmp_path, (1, 1, 1), {**TRAINING, "weight_decay": 0.0})
    recorded = [float.fromhex(value) for value in GOLDEN[(1, 1, 1)]]
    apart = [units_apart(t, r) for t, r in zip(trained, recorded)]
    assert all(units >= 10 for units in apart[1:]), apart
