"""Golden losses: the trainer's per-step losses at layouts (1, 1, 1) and (2, 2, 2), recorded on the code before
issue 12's trainer changes (the parameter table, optimizer groups from it, the optimizer-state adapter, the
explicit snapshot wait) and required bit for bit since: those changes move code, they must not move a single
bit of a training run.

The run is small (4 layers, hidden 32, 5 steps) and has weight decay, so a parameter put in the wrong decay
group changes the losses from step 2 on. Each loss is printed with 9 significant digits, which identify a
float32 exactly; the recorded values are those float32s in `float.hex`. Every rank runs one thread
(OMP_NUM_THREADS=1), so the sums inside a matrix product do not depend on the machine's core count, and the
kernels are pinned to ones that round alike on every x86 CPU: ATen's scalar kernels (ATEN_CPU_CAPABILITY=default)
and MKL's conditional numerical reproducibility mode (MKL_CBWR=COMPATIBLE). Without the pins, an AMD EPYC with
AVX-512 and the CI machine of 2026-12-02 rounded step 3 one unit apart, in opposite directions per layout; with
them the EPYC gives the values recorded before the pins, for both layouts.

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


@pytest.mark.parametrize("layout", list(GOLDEN), ids=lambda layout: "x".join(map(str, layout)))
def test_losses_are_bit_identical_to_the_recorded_run(tmp_path, layout):
    tp, pp, dp = layout
    spec = write_spec(tmp_path, model=MODEL, parallelism={"tp": tp, "pp": pp, "dp": dp}, training=TRAINING)
    outcomes = run_ranks(spec, tmp_path, world_size=tp * pp * dp, extra_env=SAME_ROUNDING_ON_EVERY_CPU)
    for code, _, err in outcomes:
        assert code == 0, err[-3000:]
    trained = [as_float32(loss).hex() for loss in losses(outcomes[0][1])]
    assert trained == GOLDEN[layout]
