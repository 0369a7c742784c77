"""The planner: which layout an attempt runs at for the ranks available (pure functions, no processes)."""

from __future__ import annotations

import itertools
import math

import pytest

from contract.layout import Layout, layout_violations
from contract.sizing import USABLE_FRACTION, fit_at
from orchestrator.planner import LayoutPlan, NoLayout, fewest_ranks, plan_layout, spec_at_layout, valid_layouts
from contract.spec import offload_mode_at, parse_spec


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


# -- sizing: a job that declares its accelerator memory (contract.sizing) -------------------------------------

# About 6.9 B parameters in bf16, one sequence per micro-batch: 32Gi per rank holds it without offload at
# (2,2,2), only with its optimizer state offloaded at (2,2,1) and (2,1,1), and neither way at (1,1,1).
BIG = {"layers": 32, "hidden_size": 4096, "heads": 32, "seq_length": 2048, "vocab_size": 50304}


def big_spec(accelerator_memory="32Gi", global_batch_size=8):
    return parse_spec({"name": "big", "model": BIG, "parallelism": {"tp": 2, "pp": 2, "dp": 2},
                       "training": {"precision": "bf16", "global_batch_size": global_batch_size,
                                    "micro_batch_size": 1},
                       "resources": {"min_ranks": 1, "accelerator_memory": accelerator_memory}})


def offload_mode(spec) -> str:
    return spec.training.offload.mode


def test_where_the_model_fits_without_offload_nothing_changes():
    spec = big_spec()
    plan = plan_layout(spec, 8)
    assert layout(plan) == (2, 2, 2) and plan.offload is None
    assert offload_mode(spec_at_layout(spec, 2, 2, 2)) == "none"


@pytest.mark.parametrize("available, expected", [(4, (2, 2, 1)), (2, (2, 1, 1))])
def test_a_reshaped_layout_where_the_model_fits_only_offloaded_runs_interleaved(available, expected):
    spec = big_spec()
    plan = plan_layout(spec, available)
    assert layout(plan) == expected
    assert plan.offload.startswith("training.offload.mode interleaved: the model fits "
                                   "resources.accelerator_memory=32Gi only with its optimizer state offloaded")
    assert f"at tp={expected[0]} pp={expected[1]} dp={expected[2]} a rank needs about" in plan.offload
    reshaped = spec_at_layout(spec, *expected)
    assert offload_mode(reshaped) == "interleaved" and offload_mode(spec) == "none"
    assert reshaped.training.offload.placement == "auto"  # the rest of training.offload as the job had it
    # What the ranks get passes the spec's own validation (a rank checks it again).
    assert parse_spec(reshaped.model_dump(mode="json")) == reshaped


def test_a_layout_where_the_model_fits_neither_way_is_never_chosen():
    spec = big_spec()
    with pytest.raises(NoLayout) as info:
        plan_layout(spec, 1)
    assert "at no valid layout of between 1 and 1 ranks does the model fit resources.accelerator_memory=32Gi, " \
           "even with its optimizer state offloaded" in info.value.reason
    with pytest.raises(ValueError, match="resources.accelerator_memory: 32Gi per rank cannot hold the model"):
        spec_at_layout(spec, 1, 1, 1)


def test_a_preferred_layout_where_the_model_does_not_fit_is_passed_over_for_one_where_it_does():
    # With one micro-batch per step at (2,2,2), (2,2,1) keeps two in flight on its first stage; (4,1,1) splits
    # the activations four ways. Give each rank just enough for (4,1,1) with offload.
    probe = big_spec(global_batch_size=2)
    need = fit_at(probe.model, probe.training, Layout(4, 1, 1), "1").memory.with_offload
    spec = big_spec(accelerator_memory=str(math.ceil(need / USABLE_FRACTION) + 1), global_batch_size=2)
    assert offload_mode_at(spec, Layout(2, 2, 1)) is None and offload_mode_at(spec, Layout(2, 1, 2)) is None
    plan = plan_layout(spec, 4)
    assert layout(plan) == (4, 1, 1) and offload_mode(spec_at_layout(spec, 4, 1, 1)) == "interleaved"
    assert "passed over tp=2 pp=2 dp=1 (and " in plan.reason and "does not fit" in plan.reason


def test_a_job_without_accelerator_memory_is_not_sized():
    spec = parse_spec({**big_spec().model_dump(mode="json", exclude_none=True),
                       "resources": {"min_ranks": 1}})
    assert layout(plan_layout(spec, 1)) == (1, 1, 1) and plan_layout(spec, 1).offload is None
    assert offload_mode(spec_at_layout(spec, 1, 1, 1)) == "none"


@pytest.mark.parametrize("spec", [spec_3d(), spec_3d(resources={"min_ranks": 3}), spec_3d(resources={}),
                                  big_spec(), big_spec("16Gi")], ids=["min1", "min3", "own-size", "big", "big-16Gi"])
def test_fewest_ranks_is_where_planning_starts_to_succeed(spec):
    """The job controller passes over a waiting job that cannot use the ranks free with fewest_ranks alone."""
    fewest = fewest_ranks(spec)
    for available in range(0, spec.world_size + 2):
        try:
            plan_layout(spec, available)
            planned = True
        except NoLayout:
            planned = False
        assert planned == (available >= fewest), available
