"""contract.sizing: the accelerator and host memory a rank needs at a layout, with and without optimizer-state
offload (pure functions), and the spec's checks that use it."""

from __future__ import annotations

import pytest

from contract.errors import SpecError
from contract.layout import Layout
from contract.sizing import (GiB, Fit, RankMemory, approximate_activation_bytes, approximate_parameters, fit_at,
                             offload_mode_for, pinned_host_bytes, rank_memory)
from contract.spec import offload_mode_at, parse_spec, spec_warnings

# About 6.9 B parameters (a 7B-class GPT) in bf16, one sequence per micro-batch.
BIG = {"layers": 32, "hidden_size": 4096, "heads": 32, "seq_length": 2048, "vocab_size": 50304}
TRAINING = {"precision": "bf16", "global_batch_size": 8, "micro_batch_size": 1}


def big_spec(parallelism=None, **resources):
    return parse_spec({"name": "big", "model": BIG, "parallelism": parallelism or {},
                       "training": TRAINING, "resources": resources})


def test_rank_memory_is_zero_1s_arithmetic():
    one = rank_memory(7_000_000_000, Layout(1, 1, 1), weight_bytes=2, activation_bytes=5)
    assert one == RankMemory(weights_and_gradients=28_000_000_000, optimizer_state=112_000_000_000, activations=5)
    assert (one.without_offload, one.with_offload) == (140_000_000_005, 28_000_000_005)
    # dp shards only the optimizer state; tp and pp split the model and its state.
    assert rank_memory(7_000_000_000, Layout(1, 1, 8), 2) == RankMemory(28_000_000_000, 14_000_000_000, 0)
    assert rank_memory(7_000_000_000, Layout(2, 2, 1), 2) == RankMemory(7_000_000_000, 28_000_000_000, 0)
    assert rank_memory(7_000_000_000, Layout(1, 1, 1), 4).weights_and_gradients == 56_000_000_000
    # Shares round up: no rank holds a fraction of a parameter.
    assert rank_memory(10, Layout(3, 1, 1), 2) == RankMemory(16, 16 * 4, 0)
    assert pinned_host_bytes(7_000_000_000, Layout(1, 1, 1), 2) == 18 * 7_000_000_000
    assert pinned_host_bytes(7_000_000_000, Layout(1, 1, 2), 2, snapshot=True) == 30 * 3_500_000_000


def test_activations_shrink_with_tp_and_micro_batch_but_not_with_pp_when_the_pipeline_is_full():
    spec = big_spec()
    m, t = spec.model, spec.training
    one = approximate_activation_bytes(m, t, Layout(1, 1, 1))
    assert 8 * GiB < one < 12 * GiB  # 32 layers of 34 bytes per token and hidden unit, plus the logits
    assert approximate_activation_bytes(m, t, Layout(2, 1, 1)) < one
    # pp=2 with 8 micro-batches: the first stage keeps 2 micro-batches of its 16 layers, as many as one stage.
    assert approximate_activation_bytes(m, t, Layout(1, 2, 1)) == one
    # ... but with a single micro-batch per step, one of 16 layers.
    single = spec.training.model_copy(update={"global_batch_size": 1})
    assert approximate_activation_bytes(m, single, Layout(1, 2, 1)) < approximate_activation_bytes(
        m, single, Layout(1, 1, 1))
    double = spec.training.model_copy(update={"micro_batch_size": 2})
    assert approximate_activation_bytes(m, double, Layout(1, 1, 1)) == 2 * one
    fp32 = spec.training.model_copy(update={"precision": "fp32"})
    assert approximate_activation_bytes(m, fp32, Layout(1, 1, 1)) > one


def test_the_mode_follows_the_fit():
    fits_without = Fit(Layout(1, 1, 1), RankMemory(10, 60, 10), accelerator_memory_bytes=100)  # 80 of 90 usable
    fits_only_with = Fit(Layout(1, 1, 1), RankMemory(10, 80, 10), accelerator_memory_bytes=100)
    fits_neither = Fit(Layout(1, 1, 1), RankMemory(80, 80, 20), accelerator_memory_bytes=100)
    assert (fits_without.fits_without_offload, fits_without.fits_with_offload) == (True, True)
    assert (fits_only_with.fits_without_offload, fits_only_with.fits_with_offload) == (False, True)
    assert (fits_neither.fits_without_offload, fits_neither.fits_with_offload) == (False, False)
    for requested in ("none", "cpu", "interleaved"):
        assert offload_mode_for(requested, fits_without) == requested
        assert offload_mode_for(requested, fits_neither) is None
    assert offload_mode_for("none", fits_only_with) == "interleaved"
    assert offload_mode_for("cpu", fits_only_with) == "cpu"  # a mode the job asked for is kept
    assert offload_mode_for("interleaved", fits_only_with) == "interleaved"


def test_a_spec_sized_at_its_layouts():
    spec = big_spec({"tp": 2, "pp": 2}, accelerator_memory="80Gi", min_ranks=1)
    assert approximate_parameters(spec.model) == pytest.approx(6.86e9, rel=0.01)
    assert offload_mode_at(spec, Layout(2, 2, 1)) == "none"         # fits without offload
    assert offload_mode_at(spec, Layout(1, 1, 1)) == "interleaved"  # fits only with
    fit = fit_at(spec.model, spec.training, Layout(1, 1, 1), "80Gi")
    assert fit.usable_bytes == int(0.9 * 80 * GiB)
    assert "without offload" in fit.describe() and "tp=1 pp=1 dp=1" in fit.describe()
    assert offload_mode_at(spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"accelerator_memory": "32Gi"})}), Layout(1, 1, 1)) is None  # fits neither way
    assert offload_mode_at(big_spec(), Layout(1, 1, 1)) == "none"  # no accelerator memory declared: as asked


def test_a_spec_whose_own_layout_fits_neither_way_is_refused_naming_the_field():
    with pytest.raises(SpecError) as refused:
        big_spec(accelerator_memory="32Gi")
    [violation] = refused.value.violations
    assert violation.field == "resources.accelerator_memory"
    assert "cannot hold the model even with its optimizer state offloaded" in violation.description
    assert "tp=1 pp=1 dp=1" in violation.description
    with pytest.raises(SpecError, match="resources.accelerator_memory"):
        big_spec(accelerator_memory="lots")
    assert big_spec(accelerator_memory="48Gi").resources.accelerator_memory == "48Gi"  # fits offloaded


def test_the_host_memory_warning_counts_the_offload_the_planner_switches_on():
    spec = big_spec(accelerator_memory="48Gi", memory="64Gi")  # mode none, but it fits only offloaded
    [warning] = spec_warnings(spec)
    assert warning.field == "resources.memory" and "pinned per rank" in warning.description
    assert spec_warnings(big_spec(memory="64Gi")) == []  # no accelerator memory declared, no offload
