"""The planner: which layout an attempt runs at for the ranks available (pure functions, no processes)."""

from __future__ import annotations

import itertools

import pytest

from contract.layout import Layout, layout_violations
from orchestrator.planner import LayoutPlan, NoLayout, plan_layout, spec_at_layout, valid_layouts
from contract.spec import parse_spec


def spec_3d(**sections):
    """tp=2 pp=2 dp=2 (8 ranks) of a model that also splits 1, 2 or 4 ways, accepting down to one rank."""
    return parse_spec({"name": "p", "model": {"layers": 4, "hidden_size": 64, "heads": 4},
                       "parallelism": {"tp": 2, "pp": 2, "dp": 2},
                       "training": {"global_batch_size": 8, "micro_batch_size": 2},
                       "resources": {"min_ranks": 1}, **sections})


def layout(plan: LayoutPlan) -> tuple[int, int, int]:
    return plan.tp, plan.pp, plan.dp


@pytest.mark.parametrize("available", [None, 8, 100])
def test_enough_ranks_keeps_the_jobs_own_layout(available):
    plan = plan_layout(spec_3d(), available)
    assert layout(plan) == (2, 2, 2)
    assert "the job's own layout" in plan.reason


def test_half_the_ranks_drops_data_parallelism_and_keeps_the_model_split():
    plan = plan_layout(spec_3d(), 4)
    assert layout(plan) == (2, 2, 1)
    assert plan.reason == "4 of 8 ranks available: tp=2 pp=2 dp=1 keeps tp=2 and pp=2"


def test_an_odd_count_uses_the_most_ranks_a_valid_layout_can():
    plan = plan_layout(spec_3d(), 7)
    assert layout(plan) == (2, 2, 1)  # nothing valid has 5, 6 or 7 ranks
    assert "4 ranks: the most a valid layout can use" in plan.reason


def test_keeps_tp_before_pp_and_prefers_fewer_stages():
    assert layout(plan_layout(spec_3d(), 2)) == (2, 1, 1)  # tp kept; pp must go
    one_stage = spec_3d(parallelism={"tp": 1, "pp": 4, "dp": 2})
    assert layout(plan_layout(one_stage, 4)) == (1, 4, 1)  # keeps pp=4 rather than (1, 1, 4)
    reason = plan_layout(spec_3d(), 2).reason
    assert "keeps tp=2" in reason and "changes pp 2->1" in reason


def test_with_neither_kept_it_picks_the_fewest_pipeline_stages():
    spec = parse_spec({"name": "p", "model": {"layers": 4, "heads": 8, "hidden_size": 64},
                       "parallelism": {"tp": 8, "pp": 1, "dp": 1}, "resources": {"min_ranks": 1}})
    plan = plan_layout(spec, 6)  # 4 ranks at most: tp=4 (tp changes either way) with one stage
    assert layout(plan) == (4, 1, 1)


def test_too_few_ranks_for_min_ranks_is_no_layout():
    spec = spec_3d(resources={"min_ranks": 4})
    with pytest.raises(NoLayout) as info:
        plan_layout(spec, 3)
    assert "3 of 8 ranks available" in info.value.reason and "at least 4" in info.value.reason
    with pytest.raises(NoLayout):
        plan_layout(spec, 0)


def test_no_valid_layout_between_min_ranks_and_available_is_no_layout():
    # 3 layers, 4 heads, global batch 8: valid sizes are products of {1,2,4} x {1,3} x {1,2,4}: no 5.
    spec = parse_spec({"name": "p", "model": {"layers": 3, "heads": 4, "hidden_size": 64},
                       "parallelism": {"tp": 2, "pp": 3, "dp": 1}, "resources": {"min_ranks": 5},
                       "training": {"global_batch_size": 8, "micro_batch_size": 2}})
    with pytest.raises(NoLayout) as info:
        plan_layout(spec, 5)
    assert "no valid layout has between 5 and 5 ranks" in info.value.reason
    assert "pp must divide layers=3" in info.value.reason


def test_the_default_min_ranks_is_the_jobs_own_size():
    spec = parse_spec({"name": "p", "parallelism": {"dp": 2},
                       "training": {"global_batch_size": 8, "micro_batch_size": 4}})
    assert layout(plan_layout(spec, 2)) == (1, 1, 2)
    with pytest.raises(NoLayout):
        plan_layout(spec, 1)


def test_every_valid_layout_passes_the_specs_own_validation():
    spec = parse_spec({"name": "p", "model": {"layers": 6, "heads": 6, "hidden_size": 96, "vocab_size": 260},
                       "parallelism": {"tp": 2, "pp": 3, "dp": 2}, "resources": {"min_ranks": 1},
                       "training": {"global_batch_size": 12, "micro_batch_size": 3}})
    layouts = valid_layouts(spec)
    assert (2, 3, 2) in layouts and (1, 1, 1) in layouts
    for tp, pp, dp in layouts:
        assert tp * pp * dp <= 12
        reshaped = spec_at_layout(spec, tp, pp, dp)
        assert reshaped.resources.ranks == tp * pp * dp
        # The spec gate accepts what the planner picked: both ask contract.layout.
        assert parse_spec(reshaped.model_dump(mode="json")) == reshaped
    assert (3, 1, 1) not in layouts  # 260 is not divisible by 3
    assert (1, 1, 3) not in layouts  # 12 is not divisible by 3*3


def test_spec_at_layout_changes_only_the_layout_and_clamps_min_ranks():
    spec = spec_3d(resources={"min_ranks": 4})
    reshaped = spec_at_layout(spec, 2, 1, 1)
    assert (reshaped.parallelism.tp, reshaped.parallelism.pp, reshaped.parallelism.dp) == (2, 1, 1)
    assert reshaped.resources.ranks == 2 and reshaped.resources.min_ranks == 2
    assert reshaped.model == spec.model and reshaped.training == spec.training
    assert spec.parallelism.dp == 2  # the original is untouched


def test_spec_at_layout_refuses_a_layout_the_rules_forbid():
    spec = spec_3d()
    with pytest.raises(ValueError, match="model.layers"):
        spec_at_layout(spec, 1, 3, 1)  # 4 layers do not split into 3 stages


def test_every_layout_the_rules_refuse_is_missing_from_the_valid_ones():
    spec = parse_spec({"name": "p", "model": {"layers": 6, "heads": 6, "hidden_size": 96, "vocab_size": 260},
                       "parallelism": {"tp": 2, "pp": 3, "dp": 2}, "resources": {"min_ranks": 1},
                       "training": {"global_batch_size": 12, "micro_batch_size": 3}})
    valid = set(valid_layouts(spec))
    for tp, pp, dp in itertools.product(range(1, 13), repeat=3):
        if tp * pp * dp <= spec.world_size:
            accepted = not layout_violations(Layout(tp, pp, dp), spec.model, spec.training)
            assert ((tp, pp, dp) in valid) == accepted, (tp, pp, dp)
