"""The parameter table (trainers.model): every parameter's global name, global shape, shard dimension, role,
initialisation and optimizer multipliers; the optimizer's groups built from it (trainers.optim), the same at
every tensor-parallel size and on every pipeline stage; `set_lr` applying each group's multiplier. In-process
and fast: the multi-rank check that megatron's layers split each parameter as the table says is in
tests/e2e/test_parallel.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contract.spec import ModelSpec, TrainingSpec
from trainers.model import (EMBEDDING, INIT_STD, MATRIX, READOUT, ROLES, VECTOR, GPTConfig, global_named_parameters,
                            init_parameters, initial_global_tensor, parameter_table)
from trainers.optim import EPS, param_groups, set_lr

CONFIG = GPTConfig.from_spec(ModelSpec(layers=4, hidden_size=32, heads=4, seq_length=16, vocab_size=256))
VARIANT = GPTConfig.from_spec(ModelSpec(layers=2, hidden_size=48, heads=4, seq_length=16, vocab_size=256,
                                        norm="rmsnorm", mlp="swiglu", positions="rotary"))


def test_each_parameter_has_its_global_shape_shard_dim_and_role():
    table = parameter_table(CONFIG)
    expected = {  # name: (global shape, shard dim, role)
        "embedding.tokens.weight": ((256, 32), 0, EMBEDDING),
        "embedding.positions.weight": ((16, 32), None, EMBEDDING),
        "blocks.3.ln_attn.weight": ((32,), None, VECTOR),
        "blocks.3.ln_attn.bias": ((32,), None, VECTOR),
        "blocks.3.attn.qkv.weight": ((96, 32), 0, MATRIX),  # column-parallel: output features split
        "blocks.3.attn.qkv.bias": ((96,), 0, VECTOR),
        "blocks.3.attn.proj.weight": ((32, 32), 1, MATRIX),  # row-parallel: input features split
        "blocks.3.attn.proj.bias": ((32,), None, VECTOR),  # added after the sum over tp: whole everywhere
        "blocks.3.ln_mlp.weight": ((32,), None, VECTOR),
        "blocks.3.ln_mlp.bias": ((32,), None, VECTOR),
        "blocks.3.mlp.fc.weight": ((128, 32), 0, MATRIX),
        "blocks.3.mlp.fc.bias": ((128,), 0, VECTOR),
        "blocks.3.mlp.proj.weight": ((32, 128), 1, MATRIX),
        "blocks.3.mlp.proj.bias": ((32,), None, VECTOR),
        "head.ln_f.weight": ((32,), None, VECTOR),
        "head.ln_f.bias": ((32,), None, VECTOR),
        "head.out.weight": ((256, 32), 0, READOUT),
    }
    for name, facts in expected.items():
        row = table[name]
        assert (row.name, (row.shape, row.shard_dim, row.role)) == (name, facts)
    # 2 embeddings, 12 per block, 3 in the head; blocks by global index, in the model's order.
    assert len(table) == 2 + 12 * 4 + 3
    assert list(table)[:3] == ["embedding.tokens.weight", "embedding.positions.weight", "blocks.0.ln_attn.weight"]
    assert list(table)[-1] == "head.out.weight"
    assert {row.role for row in table.values()} == set(ROLES)


def test_the_variant_has_gate_and_up_no_positions_and_no_norm_biases():
    table = parameter_table(VARIANT)
    assert "embedding.positions.weight" not in table
    assert not [name for name in table if ".ln_" in name and name.endswith(".bias")]
    ffn = VARIANT.ffn_size
    for name in ("gate", "up"):
        assert (table[f"blocks.1.mlp.{name}.weight"].shape, table[f"blocks.1.mlp.{name}.weight"].shard_dim) == \
            ((ffn, 48), 0)
    assert table["blocks.1.mlp.proj.weight"].shape == (48, ffn)
    assert "blocks.1.mlp.fc.weight" not in table


@pytest.mark.parametrize("config", [CONFIG, VARIANT], ids=["layernorm-gelu", "rmsnorm-swiglu"])
def test_initialisation_and_optimizer_multipliers_follow_todays_rules(config):
    residual_std = INIT_STD / math.sqrt(2 * config.layers)
    for name, row in parameter_table(config).items():
        # Weight decay on everything with two dimensions, never on biases and norm gains (as before the table).
        assert row.weight_decay_mult == (1.0 if len(row.shape) >= 2 else 0.0), name
        assert (row.role == VECTOR) == (len(row.shape) == 1), name
        assert (row.lr_mult, row.eps_mult) == (1.0, 1.0), name
        if row.role == VECTOR:
            assert row.init == ("ones" if ".ln_" in name and name.endswith(".weight") else "zeros"), name
        else:
            assert row.init == "normal", name
            assert row.init_std == (residual_std if name.endswith("proj.weight") else INIT_STD), name


def test_local_shapes_and_slices_split_the_shard_dim():
    row = parameter_table(CONFIG)["blocks.0.attn.proj.weight"]
    assert row.local_shape(1) == (32, 32) and row.local_shape(2) == (32, 16)
    full = initial_global_tensor(row, seed=3)
    assert torch.equal(torch.cat([row.local_slice(full, 2, r) for r in range(2)], dim=1), full)
    bias = parameter_table(CONFIG)["blocks.0.attn.proj.bias"]
    assert bias.local_shape(4) == (32,) and bias.local_slice(torch.ones(32), 4, 3).shape == (32,)


def test_initial_tensors_depend_on_seed_and_name_only():
    table = parameter_table(CONFIG)
    first = initial_global_tensor(table["blocks.0.attn.qkv.weight"], seed=5)
    assert torch.equal(first, initial_global_tensor(parameter_table(CONFIG)["blocks.0.attn.qkv.weight"], seed=5))
    assert not torch.equal(first, initial_global_tensor(table["blocks.1.attn.qkv.weight"], seed=5))
    assert not torch.equal(first, initial_global_tensor(table["blocks.0.attn.qkv.weight"], seed=6))
    assert first.std().item() == pytest.approx(INIT_STD, rel=0.1)


class PlainHead(nn.Module):
    """The head's parameters under the same names, without megatron (tp = 1)."""

    global_prefix = "head"

    def __init__(self, config: GPTConfig, extra: bool = False):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.vocab_size, bias=extra)


def test_init_parameters_sets_each_parameter_from_its_row_and_refuses_one_the_table_lacks():
    head = PlainHead(CONFIG)
    init_parameters(head, CONFIG, seed=9, tp=1, tp_rank=0)
    table = parameter_table(CONFIG)
    assert torch.equal(head.out.weight, initial_global_tensor(table["head.out.weight"], 9))
    assert torch.equal(head.ln_f.weight, torch.ones(32)) and torch.equal(head.ln_f.bias, torch.zeros(32))
    with pytest.raises(ValueError, match=r"not in the parameter table: \['head.out.bias'\]"):
        init_parameters(PlainHead(CONFIG, extra=True), CONFIG, seed=9, tp=1, tp_rank=0)
    with pytest.raises(ValueError, match=r"head.out.weight: shape \(256, 32\) at tp=2"):
        init_parameters(PlainHead(CONFIG), CONFIG, seed=9, tp=2, tp_rank=0)


def stage_parameters(config: GPTConfig, tp: int, prefixes: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    """Stand-ins for one stage's parameters at tensor-parallel size `tp`: the table's rows under `prefixes`,
    at their local shapes, in the model's order."""
    return [(row.name, nn.Parameter(torch.zeros(row.local_shape(tp))))
            for row in parameter_table(config).values() if row.name.startswith(prefixes)]


def describe(groups: list[dict], names: dict[int, str]) -> list[tuple]:
    """Each group's hyperparameters and its parameters' global names, in order."""
    return [(group["lr_mult"], group["weight_decay"], group["eps"], [names[id(p)] for p in group["params"]])
            for group in groups]


@pytest.mark.parametrize("config", [CONFIG, VARIANT], ids=["layernorm-gelu", "rmsnorm-swiglu"])
def test_optimizer_groups_are_identical_at_every_tensor_parallel_size(config):
    training = TrainingSpec(weight_decay=0.1)
    # Stand-in stages (parameters by prefix): the whole model, and two halves of it that hold different roles.
    stages = {"whole model": ("embedding.", "blocks.", "head."),
              "first half": ("embedding.", "blocks.0.", "blocks.1."),
              "second half": ("blocks.2.", "blocks.3.", "head.")}
    for stage, prefixes in stages.items():
        described = []
        for tp in (1, 2, 4):
            parameters = stage_parameters(config, tp, prefixes)
            groups = param_groups(parameters, parameter_table(config), training)
            described.append(describe(groups, {id(p): name for name, p in parameters}))
        assert described[0] == described[1] == described[2], stage
        # Decayed first, then the rest, on every stage: each group's parameters in the model's order.
        decayed, not_decayed = described[0]
        assert decayed[:3] == (1.0, 0.1, EPS) and not_decayed[:3] == (1.0, 0.0, EPS), stage
        rows = parameter_table(config)
        assert decayed[3] == [n for n in rows if n.startswith(prefixes) and rows[n].weight_decay_mult == 1.0]
        assert not_decayed[3] == [n for n in rows if n.startswith(prefixes) and rows[n].weight_decay_mult == 0.0]


def test_a_parameter_the_table_lacks_is_refused_by_the_optimizer():
    with pytest.raises(ValueError, match="'head.out.bias' has no row in the parameter table"):
        param_groups([("head.out.bias", nn.Parameter(torch.zeros(256)))], parameter_table(CONFIG), TrainingSpec())


def test_set_lr_applies_each_groups_multiplier():
    weights, gains = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weights], "lr_mult": 0.25}, {"params": [gains], "lr_mult": 1.0}])
    set_lr(optimizer, 0.004)
    assert [group["lr"] for group in optimizer.param_groups] == [0.001, 0.004]
    # Groups not built from the table (DeepSpeed's own, say) are refused rather than given one flat rate.
    with pytest.raises(ValueError, match="param group 0 has no 'lr_mult'"):
        set_lr(torch.optim.AdamW([weights]), 0.004)


def test_global_named_parameters_uses_each_layers_global_prefix():
    model = nn.Sequential(PlainHead(CONFIG), nn.Linear(2, 2))  # a module without global_prefix is not a layer
    assert [name for name, _ in global_named_parameters(model)] == ["head.ln_f.weight", "head.ln_f.bias",
                                                                    "head.out.weight"]
