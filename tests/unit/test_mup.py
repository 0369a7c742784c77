"""µP (trainers.mup, `model.mup`): the spec section; the parameter table's rules from global shapes (init std,
learning-rate, eps and weight-decay multipliers), the same optimizer groups at tp = 1, 2 and 4; the attention
and logit scales; σ_max by power iteration on tensor-parallel shards, which matrices a metric point reports,
and that computing it changes no weight and no random state; checkpoints that record the
parametrization and refuse to resume under another. The trainer's ranks under µP (layout parity, resumes) are
tests/e2e/test_mup_trainer.py."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contract.spec import ModelSpec, SpecError, TrainingSpec, parse_spec, spec_from_proto, spec_to_proto
from trainers.model import EMBEDDING, INIT_STD, MATRIX, READOUT, VECTOR, GPTConfig, parameter_table
from trainers.mup import (MupConfig, attention_scale, output_scale, parametrization_mismatch, record,
                          reported_matrices, top_singular_value, top_singular_values)
from trainers.optim import EPS, param_groups

from tests.unit.test_parameter_table import describe, stage_parameters

BASE = 32


def config(hidden_size: int, layers: int = 2, **mup) -> GPTConfig:
    model = ModelSpec(layers=layers, hidden_size=hidden_size, heads=4, seq_length=16, vocab_size=256,
                      mup={"base_hidden_size": BASE, **mup})
    return GPTConfig.from_spec(model)


STANDARD = GPTConfig.from_spec(ModelSpec(layers=2, hidden_size=BASE, heads=4, seq_length=16, vocab_size=256))


# -- the spec --------------------------------------------------------------------------------------------------

def test_the_mup_section_fills_its_defaults_and_travels_through_the_proto():
    spec = parse_spec({"name": "m", "model": {"hidden_size": 128, "heads": 4, "mup": {"base_hidden_size": 32}}})
    mup = spec.model.mup
    assert (mup.base_hidden_size, mup.base_head_dim, mup.output_multiplier, mup.attention_multiplier,
            mup.zero_init_readout, mup.weight_decay_exponent) == (32, None, 1.0, 1.0, False, 1.0)
    assert mup.sigma_every_steps == 50
    assert MupConfig.from_spec(spec.model).base_head_dim == 8  # base_hidden_size / heads
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert parse_spec({"name": "m"}).model.mup is None


@pytest.mark.parametrize(("mup", "field"), [
    ({}, "model.mup.base_hidden_size"),
    ({"base_hidden_size": 30}, "model.mup.base_hidden_size"),  # not divisible by 4 heads
    ({"base_hidden_size": 32, "base_head_dim": 6}, "model.mup.base_head_dim"),
    ({"base_hidden_size": 32, "weight_decay_exponent": 2}, "model.mup.weight_decay_exponent"),
    ({"base_hidden_size": 32, "output_multiplier": 0}, "model.mup.output_multiplier"),
    ({"base_hidden_size": 32, "sigma_every_steps": -1}, "model.mup.sigma_every_steps"),
    ({"base_hidden_size": 32, "width": 3}, "model.mup.width"),
])
def test_a_bad_mup_section_names_its_field(mup, field):
    with pytest.raises(SpecError) as raised:
        parse_spec({"name": "m", "model": {"hidden_size": 64, "heads": 4, "mup": mup}})
    assert field in [v.field for v in raised.value.violations], raised.value


# -- the parameter table ---------------------------------------------------------------------------------------

def test_at_the_base_width_mup_is_the_standard_parametrization_but_for_vector_like_decay():
    standard, mup = parameter_table(STANDARD), parameter_table(config(BASE))
    assert list(standard) == list(mup)
    for name, row in mup.items():
        expected = standard[name]
        if row.role in (EMBEDDING, READOUT):  # vector-like under µP: not decayed
            assert (expected.weight_decay_mult, row.weight_decay_mult) == (1.0, 0.0), name
            row = type(row)(**{**row.__dict__, "weight_decay_mult": 1.0})
        assert row == expected, name
    assert STANDARD.attention_scale is None and STANDARD.output_scale is None
    assert config(BASE).attention_scale == pytest.approx(1 / math.sqrt(BASE // 4))  # sdpa's own default
    assert config(BASE).output_scale == 1.0


@pytest.mark.parametrize("exponent", [1.0, 0.5, 0.0])
def test_matrix_like_weights_scale_with_the_width_and_vector_like_ones_do_not(exponent):
    wide = parameter_table(config(4 * BASE, weight_decay_exponent=exponent))
    base = parameter_table(config(BASE, weight_decay_exponent=exponent))
    for name, row in wide.items():
        if row.role == MATRIX:
            assert row.lr_mult == pytest.approx(1 / 4), name
            assert row.eps_mult == pytest.approx(1 / 4), name
            assert row.weight_decay_mult == pytest.approx(4 ** exponent), name
            assert row.init_std == pytest.approx(base[name].init_std / 2), name  # sqrt(fan-in ratio 4)
        else:  # vectors, embeddings, the readout: η = Θ(1), λ = 0, init unchanged
            assert (row.lr_mult, row.weight_decay_mult, row.eps_mult) == (1.0, 0.0, 1.0), name
            assert (row.init, row.init_std) == (base[name].init, base[name].init_std), name
    assert wide["blocks.1.mlp.proj.weight"].init_std == pytest.approx(INIT_STD / math.sqrt(2 * 2) / 2)
    assert wide["head.out.weight"].init_std == INIT_STD


def test_zero_init_readout_and_the_scales():
    wide = config(4 * BASE, zero_init_readout=True, output_multiplier=2.0, attention_multiplier=3.0,
                  base_head_dim=4)
    assert (parameter_table(wide)["head.out.weight"].init, parameter_table(wide)["head.out.weight"].init_std) == \
        ("zeros", 0.0)
    assert wide.output_scale == pytest.approx(2.0 / 4)
    head_dim = 4 * BASE // 4
    assert wide.attention_scale == pytest.approx(3.0 * math.sqrt(4) / head_dim)
    assert attention_scale(wide.mup, head_dim) == wide.attention_scale
    assert output_scale(wide.mup, 4 * BASE) == wide.output_scale


def test_optimizer_groups_by_global_name_are_identical_at_tp_1_2_and_4():
    wide = config(4 * BASE, layers=4)
    training = TrainingSpec(weight_decay=0.1)
    stages = {"whole model": ("embedding.", "blocks.", "head."),
              "first half": ("embedding.", "blocks.0.", "blocks.1."),
              "second half": ("blocks.2.", "blocks.3.", "head.")}
    for stage, prefixes in stages.items():
        described = []
        for tp in (1, 2, 4):
            parameters = stage_parameters(wide, tp, prefixes)
            groups = param_groups(parameters, parameter_table(wide), training)
            described.append(describe(groups, {id(p): name for name, p in parameters}))
        assert described[0] == described[1] == described[2], stage
        if stage == "whole model":
            whole = {tuple(group[:3]): group[3] for group in described[0]}  # hyperparameters -> names
    # m = 4 is a power of two: the multipliers are exact.
    matrices = [n for n, r in parameter_table(wide).items() if r.role == MATRIX]
    assert whole == {(0.25, 0.1 * 4, EPS / 4): matrices,
                     (1.0, 0.0, EPS): [n for n, r in parameter_table(wide).items() if r.role != MATRIX]}
    # Init std is a function of the global shape alone, so every layout draws the same weights.
    assert {row.init_std for row in parameter_table(wide).values() if row.role == MATRIX and "proj" not in row.name} \
        == {INIT_STD / 2}


# -- the checkpoint record ------------------------------------------------------------------------------------

def test_a_different_parametrization_is_named_by_its_field():
    base = MupConfig(base_hidden_size=32, base_head_dim=8)
    assert parametrization_mismatch(record(base), record(base)) is None
    assert parametrization_mismatch(None, record(None)) is None  # a checkpoint from before the record
    changed = parametrization_mismatch(record(base), record(MupConfig(base_hidden_size=64, base_head_dim=8)))
    assert changed.startswith("model.mup.base_hidden_size: the checkpoint was written with 32, this job has 64")
    exponent = parametrization_mismatch(record(base), record(MupConfig(32, 8, weight_decay_exponent=0.5)))
    assert exponent.startswith("model.mup.weight_decay_exponent")
    assert parametrization_mismatch(None, record(base)).startswith(
        "model.mup: the checkpoint was written under the standard parametrization")
    assert parametrization_mismatch(record(base), record(None)).startswith("model.mup: the checkpoint was written "
                                                                           "under µP")


# -- σ_max ---------------------------------------------------------------------------------------------------

def test_top_singular_value_of_a_whole_matrix():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.matrix_norm(weight, ord=2).item()
    assert top_singular_value(weight, None, iterations=100) == pytest.approx(expected, rel=1e-4)
    assert top_singular_value(torch.zeros(3, 3), None) == 0.0
    with pytest.raises(ValueError, match="needs a matrix"):
        top_singular_value(torch.zeros(3), None)


def test_top_singular_values_of_a_stage_cover_its_matrices():
    from trainers.mup import top_singular_values

    wide = config(2 * BASE)
    parameters = stage_parameters(wide, 1, ("blocks.1.", "head."))
    generator = torch.Generator().manual_seed(3)
    for _, param in parameters:
        param.data.normal_(generator=generator)
    values = top_singular_values(parameters, parameter_table(wide), iterations=100)
    assert sorted(values) == sorted(name for name, p in parameters if p.dim() == 2)
    for name, param in parameters:
        if name in values:
            assert values[name] == pytest.approx(torch.linalg.matrix_norm(param.data, ord=2).item(), rel=1e-3), name


def test_computing_sigma_max_changes_no_weight_and_no_random_state():
    parameters = stage_parameters(config(2 * BASE), 1, ("embedding.", "blocks.", "head."))
    generator = torch.Generator().manual_seed(4)
    for _, param in parameters:
        param.data.normal_(generator=generator)
    before = [param.detach().clone() for _, param in parameters]
    rng = torch.get_rng_state()
    top_singular_values(parameters, parameter_table(config(2 * BASE)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(param, saved) for (_, param), saved in zip(parameters, before))


def test_every_matrix_is_reported_while_they_fit_then_evenly_spaced_whole_blocks():
    small = parameter_table(config(BASE))
    matrices = [name for name, row in small.items() if len(row.shape) == 2]
    assert reported_matrices(small, 64) == matrices
    assert len(matrices) == 3 + 4 * 2  # token and position embeddings, readout; qkv, proj, fc, proj per block

    deep = parameter_table(config(BASE, layers=40))  # 163 matrices
    picked = reported_matrices(deep, 64)
    assert len(picked) <= 64
    blocks = sorted({int(name.split(".")[1]) for name in picked if name.startswith("blocks.")})
    assert blocks[0] == 0 and blocks[-1] == 39 and len(blocks) == (64 - 3) // 4
    assert all(f"blocks.{b}.{suffix}" in picked for b in blocks
               for suffix in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"))
    assert {"embedding.tokens.weight", "embedding.positions.weight", "head.out.weight"} <= set(picked)
    assert picked == [name for name in deep if name in picked]  # in table order


def _sharded_sigma(rank: int, world: int, port: int, weight: torch.Tensor, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for dim in (0, 1):
            shard = weight.chunk(world, dim=dim)[rank]
            results[(rank, dim)] = top_singular_value(shard, dim, iterations=100)
    finally:
        dist.destroy_process_group()


def test_top_singular_value_on_tensor_parallel_shards_is_the_global_one():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.matrix_norm(weight, ord=2).item()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sharded_sigma, args=(2, port, weight, results), nprocs=2, join=True)
        values = dict(results)
    assert len(values) == 4
    for key, value in values.items():  # row-split and column-split alike, on both ranks
        assert value == pytest.approx(expected, rel=1e-4), key
