"""HybridAdam on the simulated device: bit-identical to torch's fused AdamW over the whole flat tensors for every
placement, with per-group lr, weight decay and eps; and the simulated device catches a missing event wait."""

from __future__ import annotations

import os
import random

import pytest
import torch

from offload import HybridAdam, OffloadSettings, Placement, SimulatedDevice, build, merge_ds_config
from offload.device import COMPUTE, D2H, H2D, DeviceOutOfMemory
from offload.subgroups import ALIGN, build_table, split, spread

# Two flat partitions, as ZeRO-1 hands them over: one per parameter group (µP-like: each group its own lr, eps
# and weight decay). Sizes not multiples of the subgroup size, so the last subgroup of each is short.
SIZES = [5000, 1234]
GROUP_HYPER = [dict(lr=3e-3, weight_decay=0.1, eps=1e-8), dict(lr=1e-2, weight_decay=0.0, eps=1e-6)]
BETAS = (0.9, 0.95)
SUBGROUP = 500  # rounded up to 512: 10 + 3 subgroups


def flat_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).requires_grad_() for n in SIZES]


def groups(params):
    return [dict(params=[p], **h) for p, h in zip(params, GROUP_HYPER)]


def set_grads(param_lists, step):
    g = torch.Generator().manual_seed(100 + step)
    for n, *ps in zip(SIZES, *param_lists):
        grad = torch.randn(n, generator=g)
        for p in ps:
            p.grad = grad.clone()


def step_like_deepspeed(opt):
    """DeepSpeed's ZeRO-1 offload path: step() once per group, param_groups narrowed to it."""
    full = opt.param_groups
    for group in full:
        opt.param_groups = [group]
        opt.step()
    opt.param_groups = full


@pytest.fixture
def device():
    d = SimulatedDevice(memory_bytes=1 << 24, h2d_bytes_per_s=200e6, d2h_bytes_per_s=200e6,
                        adam_elems_per_s=100e6, jitter=1.0, seed=3)
    yield d
    d.close()


def assert_same_as_fused_adamw(device, placement_for_step, steps=4):
    ref_params, params = flat_params(), flat_params()
    reference = torch.optim.AdamW(groups(ref_params), betas=BETAS, fused=True)
    opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP)
    for step in range(steps):
        set_grads([ref_params, params], step)
        reference.step()
        opt.set_placement(placement_for_step(opt.table, step))
        step_like_deepspeed(opt)
        for r, p in zip(ref_params, params):
            assert torch.equal(r, p), f"params differ at step {step}"
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(reference.state[r][key], opt.state[p][key]), f"{key} differs at step {step}"
    return opt


def test_table_cuts_aligned_subgroups_within_each_parameter():
    table = build_table([[s] for s in SIZES], SUBGROUP)
    assert [s.numel for s in table] == [512] * 9 + [392] + [512, 512, 210]
    assert all(s.start % ALIGN == 0 for s in table)
    assert [s.group for s in table] == [0] * 10 + [1] * 3
    assert split(10, 1) == [(0, 10)]  # never below the alignment


@pytest.mark.parametrize("name", ["all_cpu", "all_device", "mixed", "stride_2"])
def test_every_placement_is_bit_identical_to_fused_adamw(device, name):
    def placement(table, step):
        return {"all_cpu": Placement.all_cpu(),
                "all_device": Placement.all_device(table, slots=2),
                "mixed": Placement.fraction(table, 0.5, slots=3),
                "stride_2": Placement.stride(table, 2, slots=1)}[name]
    opt = assert_same_as_fused_adamw(device, placement)
    if name != "all_cpu":
        assert device.allocated_bytes() == placement(opt.table, 0).slots * 4 * 4 * 512  # the ring, sized once


def test_a_random_placement_each_step_is_bit_identical(device):
    rng = random.Random(7)

    def placement(table, step):
        return Placement(frozenset(s.index for s in table if rng.random() < 0.5), slots=rng.randint(1, 4))
    assert_same_as_fused_adamw(device, placement, steps=6)


@pytest.mark.parametrize("skipped", [H2D, COMPUTE, D2H, None])
def test_simulated_device_catches_a_missing_event_wait(skipped):
    """None: the control, every wait kept, under the same throttles: exact."""
    class SkipsWaits(SimulatedDevice):
        def wait(self, stream, event):
            if stream != skipped:
                super().wait(stream, event)
    # What the skipped wait was for is made slow (~5 ms per 2 KiB subgroup tensor), so the stream that no longer
    # waits always runs ahead of it: the update reads a slot whose copy in has not landed (NaN), the copy out
    # takes values not yet updated, the copy in overwrites a slot whose copy out has not finished.
    slow = {COMPUTE: dict(h2d_bytes_per_s=4e5), D2H: dict(adam_elems_per_s=1e5),
            H2D: dict(d2h_bytes_per_s=4e5), None: dict(h2d_bytes_per_s=4e5, d2h_bytes_per_s=4e5)}[skipped]
    device = SkipsWaits(memory_bytes=1 << 24, **slow)
    try:
        ref_params, params = flat_params(), flat_params()
        reference = torch.optim.AdamW(groups(ref_params), betas=BETAS, fused=True)
        opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP)
        opt.set_placement(Placement.all_device(opt.table, slots=2))
        set_grads([ref_params, params], 0)
        reference.step()
        step_like_deepspeed(opt)
        exact = all(torch.equal(r, p) for r, p in zip(ref_params, params))
        assert exact == (skipped is None)
    finally:
        device.close()


def test_simulated_device_catches_a_missing_final_synchronize():
    # Copies out take ~5 ms per subgroup tensor, so they are still running when step() returns without waiting.
    device = SimulatedDevice(memory_bytes=1 << 24, d2h_bytes_per_s=4e5)
    try:
        ref_params, params = flat_params(), flat_params()
        reference = torch.optim.AdamW(groups(ref_params), betas=BETAS, fused=True)
        opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP)
        opt.set_placement(Placement.all_device(opt.table, slots=2))
        set_grads([ref_params, params], 0)
        reference.step()
        real_synchronize = device.synchronize
        device.synchronize = lambda: None
        step_like_deepspeed(opt)
        assert not torch.equal(ref_params[0], params[0])  # NaN (a copy in flight) or the old values
        real_synchronize()
        assert all(torch.equal(r, p) for r, p in zip(ref_params, params))  # once waited for: exact
    finally:
        device.close()


def test_placement_is_fixed_until_replanned(device):
    calls = []

    def planner(table):
        calls.append(len(table))
        return Placement.fraction(table, 0.5, slots=2)
    params = flat_params()
    opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP, planner=planner)
    for step in range(3):
        set_grads([params], step)
        step_like_deepspeed(opt)
    assert calls == [13]
    first = opt.placement
    assert first == Placement.fraction(opt.table, 0.5, slots=2)
    assert opt.replan() == first and calls == [13, 13]  # deterministic


def test_state_dict_round_trip_keeps_the_state_tensors(device):
    params = flat_params()
    opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP,
                     placement=Placement.all_cpu())
    set_grads([params], 0)
    step_like_deepspeed(opt)
    saved = {k: v for k, v in opt.state_dict().items()}
    saved = {"state": {i: {k: t.clone() for k, t in s.items()} for i, s in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    tensors = {k: opt.state[params[0]][k] for k in ("step", "exp_avg", "exp_avg_sq")}
    set_grads([params], 1)
    step_like_deepspeed(opt)
    opt.load_state_dict(saved)
    for k, t in tensors.items():
        assert opt.state[params[0]][k] is t
        assert torch.equal(t, saved["state"][0][k])
    assert [g["lr"] for g in opt.param_groups] == [h["lr"] for h in GROUP_HYPER]


def test_ring_obeys_the_device_memory_cap():
    device = SimulatedDevice(memory_bytes=4 * 4 * 512 * 2)  # two slots' worth
    try:
        params = flat_params()
        opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP)
        opt.set_placement(Placement.all_device(opt.table, slots=3))
        set_grads([params], 0)
        with pytest.raises(DeviceOutOfMemory):
            step_like_deepspeed(opt)
    finally:
        device.close()


def test_spread_is_even_and_starts_at_zero():
    assert spread(0, 5) == []
    assert spread(1, 5) == [0]
    assert spread(2, 4) == [0, 2]
    assert spread(3, 10) == [0, 4, 7]
    assert spread(5, 5) == [0, 1, 2, 3, 4]


def test_build_modes_and_settings_errors_name_the_field(device):
    params = flat_params()
    none = build(OffloadSettings(), groups(params), lr=1e-3, betas=BETAS, eps=1e-8)
    assert type(none.optimizer) is torch.optim.AdamW and none.ds_config == {}
    cpu = build(OffloadSettings(mode="cpu"), groups(flat_params()), lr=1e-3, betas=BETAS, eps=1e-8)
    assert isinstance(cpu.optimizer, HybridAdam) and cpu.optimizer.device is None
    assert cpu.ds_config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    static = build(OffloadSettings(mode="interleaved", placement="static", device_fraction=0.5, subgroup_size=500),
                   groups(flat_params()), lr=1e-3, betas=BETAS, eps=1e-8, device=device)
    assert static.optimizer.placement == Placement.fraction(static.optimizer.table, 0.5, slots=4)
    merged = merge_ds_config({"zero_optimization": {"stage": 1}}, static.ds_config)
    assert merged["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert merged["zero_force_ds_cpu_optimizer"] is False and merged["zero_allow_untested_optimizer"] is True

    for kwargs, field in [(dict(mode="gpu"), "mode"), (dict(subgroup_size=0), "subgroup_size"),
                          (dict(placement="static"), "device_fraction"), (dict(device_fraction=0.5), "device_fraction"),
                          (dict(cpu_threads=0), "cpu_threads"), (dict(placement="fixed"), "placement")]:
        with pytest.raises(ValueError, match=f"training.offload.{field}"):
            OffloadSettings(**kwargs)


def test_build_interleaved_auto_plans_at_the_first_step_and_matches_fused_adamw(device):
    ref_params, params = flat_params(), flat_params()
    reference = torch.optim.AdamW(groups(ref_params), betas=BETAS, fused=True)
    built = build(OffloadSettings(mode="interleaved", profile="h100-pcie5", subgroup_size=500), groups(params),
                  lr=1e-3, betas=BETAS, eps=1e-8, device=device)
    for step in range(2):
        set_grads([ref_params, params], step)
        reference.step()
        step_like_deepspeed(built.optimizer)
    placement = built.optimizer.placement
    assert placement.on_device and len(placement.on_device) < len(built.optimizer.table)
    assert all(torch.equal(r, p) for r, p in zip(ref_params, params))


def test_prefetch_before_each_step_is_bit_identical_and_saves_copies():
    class CountsCopies(SimulatedDevice):
        copies = 0

        def copy(self, stream, dst, src):
            if stream == H2D:
                CountsCopies.copies += 1
            super().copy(stream, dst, src)
    device = CountsCopies(memory_bytes=1 << 24, h2d_bytes_per_s=50e6, d2h_bytes_per_s=50e6, jitter=1.0)
    try:
        ref_params, params = flat_params(), flat_params()
        reference = torch.optim.AdamW(groups(ref_params), betas=BETAS, fused=True)
        opt = HybridAdam(groups(params), betas=BETAS, device=device, subgroup_size=SUBGROUP,
                         placement=Placement(frozenset(range(1, 13)), slots=3))  # not subgroup 0: group 0 from 1
        on_device = len(opt.placement.on_device)
        for step in range(3):
            set_grads([ref_params, params], step)
            reference.step()
            assert opt.prefetch() == 3
            CountsCopies.copies = 0
            step_like_deepspeed(opt)
            # four tensors per device subgroup, less the param and moments of the three prefetched
            assert CountsCopies.copies == 4 * on_device - 3 * 3
            for r, p in zip(ref_params, params):
                assert torch.equal(r, p) and torch.equal(reference.state[r]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
        opt.prefetch()
        opt.set_placement(Placement.all_cpu())  # a placement change drops the prefetch
        set_grads([ref_params, params], 3)
        reference.step()
        step_like_deepspeed(opt)
        assert all(torch.equal(r, p) for r, p in zip(ref_params, params))
    finally:
        device.close()


def test_the_cpu_update_runs_on_cpu_threads_and_leaves_torchs_setting_as_it_was(monkeypatch):
    import offload.hybrid_adam as hybrid_adam
    from offload.build import cpu_threads

    seen = []
    real = hybrid_adam.adamw_fused
    monkeypatch.setattr(hybrid_adam, "adamw_fused", lambda *args: (seen.append(torch.get_num_threads()),
                                                                    real(*args)))
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    optimizer = HybridAdam(groups(flat_params()), betas=BETAS, subgroup_size=SUBGROUP, cpu_threads=wanted)
    set_grads([optimizer.param_groups[0]["params"] + optimizer.param_groups[1]["params"]], 0)
    optimizer.step()
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == before
    # build's default: one thread per core this process may run on.
    assert cpu_threads(OffloadSettings(mode="cpu")) == len(os.sched_getaffinity(0))
    assert cpu_threads(OffloadSettings(mode="cpu", cpu_threads=5)) == 5
    assert build(OffloadSettings(mode="cpu", cpu_threads=5), groups(flat_params()), lr=1e-3, betas=BETAS,
                 eps=1e-8).optimizer.cpu_threads == 5
