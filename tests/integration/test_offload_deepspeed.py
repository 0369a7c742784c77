"""HybridAdam inside a real DeepSpeed ZeRO-1 engine with CPU offload (one rank, gloo, bf16): the same losses as
DeepSpeed with torch's fused AdamW, and a checkpoint of its state that loads back to an equal state.

The engines run in a child process (DeepSpeed's process group and globals stay out of pytest's)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 4
SAVE_AT = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("offload-ds")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions")}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_losses_identical_to_deepspeed_with_torch_fused_adamw(results):
    reference = results["torch_adamw"]
    assert len(reference) == STEPS
    assert results["hybrid_mixed"] == reference
    assert results["hybrid_all_device"] == reference
    assert results["hybrid_all_cpu"] == reference
    assert reference[-1] < reference[0]  # it trains


def test_hybrid_state_is_torch_shaped_and_ds_links_it(results):
    assert results["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert results["state_same_as_torch"]
    assert results["fragment_is_view_of_state"]


def test_checkpoint_loads_to_equal_state_and_resumes_exactly(results):
    assert results["loaded_state_equal"]
    assert results["loaded_state_in_place"]
    assert results["resumed"] == results["hybrid_mixed"][SAVE_AT:]


def test_checkpoint_with_offload_resumes_without_it_and_the_reverse(results):
    assert results["resumed_without_offload"] == results["hybrid_mixed"][SAVE_AT:]
    assert results["resumed_with_offload_from_plain"] == results["hybrid_mixed"][SAVE_AT:]


# --- the child process -------------------------------------------------------------------------------------
def _child(out: Path) -> None:
    import logging

    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state
    from torch import nn

    from offload import HybridAdam, Placement, SimulatedDevice, ds_config_for, merge_ds_config

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(64, 32), nn.Flatten(), nn.Linear(32 * 8, 64), nn.LayerNorm(64),
                             nn.GELU(), nn.Linear(64, 64))

    def groups(m):
        decay = [p for p in m.parameters() if p.dim() >= 2]
        no_decay = [p for p in m.parameters() if p.dim() < 2]
        # Per-group lr, weight decay and eps, as µP's groups will have.
        return [{"params": decay, "weight_decay": 0.1, "lr": 3e-3, "eps": 1e-8},
                {"params": no_decay, "weight_decay": 0.0, "lr": 1e-2, "eps": 1e-6}]

    base = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 1}, "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1,
            # bf16 as the trainer runs: DeepSpeed casts the host fp32 master to bf16 right after each step()
            "bf16": {"enabled": True}}
    config = merge_ds_config(base, ds_config_for("interleaved"))
    devices = []

    def engine(kind: str):
        m = model()
        if kind in ("torch_adamw", "no_offload"):
            opt = torch.optim.AdamW(groups(m), betas=(0.9, 0.95), fused=True)
        else:
            device = SimulatedDevice(h2d_bytes_per_s=2e9, d2h_bytes_per_s=2e9, jitter=0.5)
            devices.append(device)

            def planner(table, kind=kind):
                if kind == "hybrid_all_cpu":
                    return Placement.all_cpu()
                if kind == "hybrid_all_device":
                    return Placement.all_device(table, slots=2)
                return Placement.fraction(table, 0.5, slots=2)
            opt = HybridAdam(groups(m), betas=(0.9, 0.95), device=device, subgroup_size=1000, planner=planner)
        eng, _, _, _ = deepspeed.initialize(model=m, optimizer=opt,
                                            config=base if kind == "no_offload" else config)
        return eng

    def batches():
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS * 2):
            x = torch.randint(0, 64, (2, 8), generator=g)
            yield x, x.sum(dim=1) % 64

    def train(eng, data, steps):
        losses = []
        prefetch = getattr(eng.optimizer.optimizer, "prefetch", lambda: 0)
        for _ in range(steps):
            prefetch()  # HybridAdam: the first device subgroups come in during forward and backward
            for _ in range(2):
                x, y = next(data)
                loss = nn.functional.cross_entropy(eng(x).float(), y)
                eng.backward(loss)
                eng.step()
            losses.append(float(loss))
        return losses

    results = {}
    engines = {}
    for kind in ("torch_adamw", "hybrid_all_cpu", "hybrid_all_device", "hybrid_mixed"):
        eng = engine(kind)
        data = batches()
        if kind == "hybrid_mixed":
            results[kind] = train(eng, data, SAVE_AT)
            eng.save_checkpoint(str(out / "ckpt"), tag="t")
            results[kind] += train(eng, data, STEPS - SAVE_AT)
        else:
            results[kind] = train(eng, data, STEPS)
        engines[kind] = eng

    hybrid = engines["hybrid_mixed"].optimizer.optimizer
    reference = engines["torch_adamw"].optimizer.optimizer
    assert hybrid.placement.on_device and len(hybrid.placement.on_device) < len(hybrid.table)
    flat = hybrid.param_groups[0]["params"][0]
    results["state_keys"] = sorted(hybrid.state[flat])
    results["state_same_as_torch"] = all(
        sorted(reference.state[r]) == sorted(hybrid.state[h]) and all(
            torch.equal(reference.state[r][k], hybrid.state[h][k]) for k in reference.state[r])
        for r, h in zip((g["params"][0] for g in reference.param_groups),
                        (g["params"][0] for g in hybrid.param_groups)))
    first = next(engines["hybrid_mixed"].module.parameters())
    fragment = first._hp_mapping.get_optim_state_fragment("exp_avg")
    results["fragment_is_view_of_state"] = (
        fragment.untyped_storage().data_ptr() == hybrid.state[flat]["exp_avg"].untyped_storage().data_ptr())
    assert torch.equal(safe_get_full_optimizer_state(first, "exp_avg").view(-1), fragment)

    # Load the step-2 checkpoint into a fresh engine that has already stepped once (so its state exists and
    # must be overwritten in place), then train the remaining steps on the same data.
    eng = engine("hybrid_mixed")
    data = batches()
    train(eng, data, 1)
    loaded = eng.optimizer.optimizer
    before = {k: loaded.state[loaded.param_groups[0]["params"][0]][k] for k in ("exp_avg", "exp_avg_sq")}
    eng.load_checkpoint(str(out / "ckpt"), tag="t")
    (optim_file,) = (out / "ckpt" / "t").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    saved = torch.load(optim_file, weights_only=False)
    saved_state = saved["optimizer_state_dict"]["base_optimizer_state"]["state"]
    loaded_flat = loaded.param_groups[0]["params"][0]
    results["loaded_state_equal"] = all(
        torch.equal(saved_state[i][k], loaded.state[g["params"][0]][k])
        for i, g in enumerate(loaded.param_groups) for k in ("step", "exp_avg", "exp_avg_sq"))
    results["loaded_state_in_place"] = all(before[k] is loaded.state[loaded_flat][k] for k in before)
    data = batches()
    for _ in range(SAVE_AT * 2):
        next(data)
    results["resumed"] = train(eng, data, STEPS - SAVE_AT)

    def rest_of_data():
        data = batches()
        for _ in range(SAVE_AT * 2):
            next(data)
        return data

    # A checkpoint written with interleaved offload resumes without offload, and the reverse.
    eng = engine("no_offload")
    eng.load_checkpoint(str(out / "ckpt"), tag="t")
    results["resumed_without_offload"] = train(eng, rest_of_data(), STEPS - SAVE_AT)
    eng = engine("no_offload")
    train(eng, batches(), SAVE_AT)
    eng.save_checkpoint(str(out / "ckpt"), tag="plain")
    eng = engine("hybrid_mixed")
    eng.load_checkpoint(str(out / "ckpt"), tag="plain")
    results["resumed_with_offload_from_plain"] = train(eng, rest_of_data(), STEPS - SAVE_AT)
    for device in devices:
        device.close()
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
