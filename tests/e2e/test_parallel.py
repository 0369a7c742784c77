"""The 3D-parallel trainer: every layout computes the same training run, the rank orders of megatron-core
and DeepSpeed agree, and each tensor-parallel shard is the right slice of the global weight."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from orchestrator.launcher.local import free_port
from trainers.parallel import ParallelDims

from tests.e2e.test_trainer import losses, run_ranks, val_losses, write_spec
from tests.support.waiting import DEADLINE

pytestmark = pytest.mark.slow

# Each axis alone, then two together. All three together: the golden losses' 2x2x2 (the recorded values to
# one float32 unit, which are those of 1x1x1 to 1e-6), so no eight-rank run here. The variant's layers differ from the
# default ones under tensor and pipeline parallelism; data parallelism only splits the batch.
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
PARITY_STEPS = 4


@pytest.mark.parametrize(("tp", "pp", "dp"), [(2, 2, 2), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 4, 2)])
def test_rank_order_is_the_same_in_roundhouse_megatron_and_deepspeed(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core.parallel_state import RankGenerator

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    megatron = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    group_of = {axis: {r: group for group in megatron.get_ranks(axis) for r in group} for axis in ("tp", "dp", "pp")}
    for rank in range(tp * pp * dp):
        dims = ParallelDims(tp, pp, dp, rank)
        coordinate = topology.get_coord(rank)
        assert (dims.tp_rank, dims.pp_rank, dims.dp_rank) == (coordinate.model, coordinate.pipe, coordinate.data)
        # megatron's groups: a rank's position in its tp group is its tp rank, and so on.
        assert group_of["tp"][rank].index(rank) == dims.tp_rank
        assert group_of["dp"][rank].index(rank) == dims.dp_rank
        assert group_of["pp"][rank].index(rank) == dims.pp_rank
        assert dims.rank_of(dims.tp_rank, dims.pp_rank, dims.dp_rank) == rank


MODEL = {"layers": 4, "hidden_size": 32, "heads": 4, "seq_length": 32}
VARIANT = {**MODEL, "norm": "rmsnorm", "mlp": "swiglu", "positions": "rotary"}


@pytest.mark.parametrize(("model", "layouts"), [
    pytest.param(MODEL, LAYOUTS, id="layernorm-gelu-learned"),
    pytest.param(VARIANT, [(1, 1, 1), (2, 2, 1)], id="rmsnorm-swiglu-rotary"),
])
def test_every_layout_trains_the_same_losses(tmp_path, model, layouts):
    """Same seed, data and global batch: the loss of each step agrees across layouts to 1e-5 (fp32)."""
    results = {}
    for tp, pp, dp in layouts:
        spec = write_spec(tmp_path, model=model, parallelism={"tp": tp, "pp": pp, "dp": dp},
                          training={"steps": PARITY_STEPS, "global_batch_size": 8, "micro_batch_size": 2,
                                    "learning_rate": 3e-3, "warmup_steps": 0, "eval_interval": PARITY_STEPS,
                                    "seed": 7})
        run_dir = tmp_path / f"run-{tp}{pp}{dp}"
        run_dir.mkdir()
        outcomes = run_ranks(spec, run_dir, world_size=tp * pp * dp)
        for code, _, err in outcomes:
            assert code == 0, f"layout {(tp, pp, dp)}: {err[-3000:]}"
        out = outcomes[0][1]
        assert f"layout tp={tp} pp={pp} dp={dp}" in out
        results[(tp, pp, dp)] = (losses(out), val_losses(out))
    reference_losses, reference_val = results[(1, 1, 1)]
    assert len(reference_losses) == PARITY_STEPS and len(reference_val) == 1
    assert reference_losses[-1] < reference_losses[0]  # it trains
    for layout, (layout_losses, layout_val) in results.items():
        assert layout_losses == pytest.approx(reference_losses, rel=1e-5), layout
        assert layout_val == pytest.approx(reference_val, rel=1e-5), layout


SHARD_CHECK = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from megatron.core import parallel_state
    from contract.spec import ModelSpec
    from trainers import parallel
    from trainers.model import Block, Embedding, GPTConfig, Head, initial_global_tensor, parameter_table
    tp, rank = 2, int(os.environ["RANK"])
    dims = parallel.ParallelDims(tp=tp, pp=1, dp=1, rank=rank)
    parallel.setup(dims, "127.0.0.1", int(os.environ["MASTER_PORT"]), rank)
    config = GPTConfig.from_spec(ModelSpec(layers=2, hidden_size=32, heads=4, seq_length=16, vocab_size=256))
    table = parameter_table(config)
    layers = [Embedding(config, tp, rank, 11), Block(config, tp, rank, 11, 1), Head(config, tp, rank, 11)]
    # The table lists the parameters in the order the layers register them (the optimizer's order).
    names = [f"{layer.global_prefix}.{name}" for layer in layers for name, _ in layer.named_parameters()]
    assert names == [n for n in table if n.startswith(("embedding.", "blocks.1.", "head."))], names
    checked = 0
    for layer in layers:
        for name, param in layer.named_parameters():
            row = table[f"{layer.global_prefix}.{name}"]
            full = initial_global_tensor(row, 11)
            assert tuple(full.shape) == row.shape, name
            # megatron marks the parameters it splits, and along which dimension: it must agree with the table.
            assert getattr(param, "tensor_model_parallel", False) == (row.shard_dim is not None), name
            if row.shard_dim is None:
                assert torch.equal(param, full), name
                continue
            assert param.partition_dim == row.shard_dim, (name, param.partition_dim, row.shard_dim)
            assert torch.equal(param, full.chunk(tp, row.shard_dim)[rank]), name
            # The shards of all tp ranks put together are exactly the global tensor.
            pieces = [torch.empty_like(param) for _ in range(tp)]
            dist.all_gather(pieces, param.detach().contiguous())
            assert torch.equal(torch.cat(pieces, row.shard_dim), full), name
            checked += 1
    vocab = layers[0].tokens
    assert (vocab.vocab_start_index, vocab.vocab_end_index) == (rank * 128, (rank + 1) * 128)
    parallel.teardown()
    print("checked", checked)
""")


def test_each_tensor_parallel_shard_is_its_slice_of_the_global_weight(tmp_path):
    port = free_port()
    env = {**os.environ, "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_CHECK], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err[-3000:]
        # Sharded: the token embedding, qkv and fc (weights and biases), both projections, the head.
        assert "checked 8" in out




def test_the_startup_phase_says_when_deepspeeds_op_is_missing_or_being_built(tmp_path, monkeypatch):
    from trainers.parallel import startup_phase

    ops = tmp_path / "deepspeed_shm_comm"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert startup_phase().startswith("building")
    ops.mkdir()
    (ops / "deepspeed_shm_comm.so").write_bytes(b"")
    assert startup_phase() == "joining its peers"
    (ops / "lock").write_text("")
    assert startup_phase().startswith("waiting on another build")
