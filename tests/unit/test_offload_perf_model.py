"""The performance model and the planner as pure functions: monotone in bandwidth, within the memory cap,
deterministic; the shipped profiles load; `python -m offload plan` explains its decision."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from offload.perf_model import (BYTES_IN, choose_placement, cpu_offload_seconds, device_pipeline_seconds,
                                interleaved_seconds, known_profiles, load_profile, ring_bytes)
from offload.plan import plan
from offload.subgroups import Placement, build_table

PROFILE = load_profile("h100-pcie5")
TABLE = build_table([[200_000_000], [1_000_000]], 10_000_000)   # a decay and a small no-decay partition


def with_bandwidth(profile, scale):
    return dataclasses.replace(profile, **{f: getattr(profile, f) * scale for f in (
        "h2d_bytes_per_s", "d2h_bytes_per_s", "h2d_concurrent_bytes_per_s", "d2h_concurrent_bytes_per_s")})


def test_shipped_profiles_load_and_are_marked_as_estimates():
    assert {"h100-pcie5", "h200-pcie5"} <= set(known_profiles())
    for name in known_profiles():
        assert load_profile(name).estimate


def test_interleaved_beats_cpu_offload_and_puts_work_on_both_sides():
    d = choose_placement(TABLE, PROFILE)
    assert 0 < len(d.placement.on_device) < len(TABLE)
    assert d.interleaved_s < d.cpu_offload_s
    assert d.no_offload_s < d.interleaved_s
    # both groups have subgroups on each side, the first of each on the device (both sides start at once)
    for g in (0, 1):
        members = [s for s in TABLE if s.group == g]
        if len(members) > 1:
            assert members[0].index in d.placement.on_device
            assert any(s.index not in d.placement.on_device for s in members)


def test_more_bandwidth_never_slows_the_update_nor_shrinks_the_device_share():
    previous_time, previous_share = None, None
    for scale in (0.1, 0.25, 0.5, 1, 2, 4, 8):
        d = choose_placement(TABLE, with_bandwidth(PROFILE, scale))
        if previous_time is not None:
            assert d.interleaved_s <= previous_time
            assert d.device_fraction >= previous_share
        previous_time, previous_share = d.interleaved_s, d.device_fraction


def test_pipeline_time_grows_with_work_and_shrinks_with_bandwidth_and_slots():
    work = [10_000_000] * 8
    assert device_pipeline_seconds(work[:4], 3, PROFILE) < device_pipeline_seconds(work, 3, PROFILE)
    assert device_pipeline_seconds(work, 3, with_bandwidth(PROFILE, 2)) < device_pipeline_seconds(work, 3, PROFILE)
    assert device_pipeline_seconds(work, 1, PROFILE) > device_pipeline_seconds(work, 3, PROFILE)
    # one subgroup through one slot: in, update, out
    n = 10_000_000
    assert device_pipeline_seconds([n], 1, PROFILE) == pytest.approx(
        n * BYTES_IN / PROFILE.h2d_bytes_per_s + n / PROFILE.device_adam_params_per_s
        + n * 12 / PROFILE.d2h_bytes_per_s)


def test_ring_respects_the_memory_cap():
    slot = 4 * 4 * 10_000_000
    for free, slots in [(0, 0), (slot - 1, 0), (slot, 1), (2 * slot + 5, 2), (100 * slot, 4)]:
        d = choose_placement(TABLE, PROFILE, free_bytes=free)
        assert d.placement.slots == slots
        assert d.ring_bytes == ring_bytes(TABLE, slots) <= free
        if slots == 0:
            assert not d.placement.on_device and d.interleaved_s == pytest.approx(d.cpu_offload_s)


def test_choice_is_deterministic_and_the_best_of_the_even_fractions():
    a, b = choose_placement(TABLE, PROFILE), choose_placement(TABLE, PROFILE)
    assert a == b
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        other = Placement.fraction(TABLE, fraction, slots=a.placement.slots)
        assert a.interleaved_s <= interleaved_seconds(TABLE, other, PROFILE) + 1e-12


def test_cpu_offload_time_is_cpu_update_plus_bf16_refresh():
    n = 1_000_000_000
    assert cpu_offload_seconds(n, PROFILE) == pytest.approx(n / PROFILE.cpu_adam_params_per_s
                                                            + 2 * n / PROFILE.h2d_bytes_per_s)


def test_plan_says_what_fits():
    small = plan(1_000_000_000, PROFILE)
    assert small.fits_without_offload and small.mode == "none"
    middle = plan(7_000_000_000, PROFILE)
    assert not middle.fits_without_offload and middle.fits_with_offload and middle.mode == "interleaved"
    assert middle.host_pinned_bytes_offload == 18 * 7_000_000_000
    assert plan(7_000_000_000, PROFILE, dp=8).mode == "none"  # ZeRO-1 shards the state over dp
    huge = plan(40_000_000_000, PROFILE)
    assert huge.mode == "does not fit" and not huge.fits_with_offload
    assert plan(1_000_000_000, PROFILE, device_memory_bytes=8 << 30).mode == "interleaved"
    with pytest.raises(ValueError, match="dp must be a positive integer"):
        plan(1_000_000_000, PROFILE, dp=0)


def test_plan_command_explains_the_decision():
    out = subprocess.run([sys.executable, "-m", "offload", "plan", "--params", "7B", "--profile", "h200-pcie5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ESTIMATE" in out.stdout and "decision: mode interleaved" in out.stdout
    assert "DeepSpeed CPU offload" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "offload", "plan", "--params", "lots", "--profile", "h200-pcie5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--params" in bad.stderr


def test_calibration_measures_every_input_of_the_model():
    from offload.calibrate import measure
    from offload.device import SimulatedDevice
    device = SimulatedDevice(memory_bytes=1 << 26)
    try:
        profile = measure(device, numel=1 << 15, repeats=1)
    finally:
        device.close()
    assert not profile.estimate
    assert profile.device_free_bytes == profile.device_memory_bytes == 1 << 26  # calibration slots freed
    d = choose_placement(TABLE, profile)  # usable by the model as it is
    assert d.interleaved_s > 0


def test_plan_picks_cpu_offload_when_the_device_would_not_help():
    slow_link = dataclasses.replace(with_bandwidth(PROFILE, 1e-4), device_adam_params_per_s=1e6)
    report = plan(7_000_000_000, slow_link)
    assert report.mode == "cpu" and not report.decision.placement.on_device
    assert "mode cpu" in report.explain()
