"""Optimizer-state offload in the trainer (`training.offload`): the spec section and its checks, the planner's
commands, and the ranks as real processes with interleaved offload on the simulated device (a machine without
CUDA gets one, so these runs take the same code path a GPU would).

Covers: at (1,1,1), (1,2,1), (1,1,2) and (2,1,1) a mixed placement (half the subgroups on the device) gives the
losses of an all-CPU placement bit for bit, and those of no offload to 1e-6, and the loss falls; the manifest
records each rank's placement; a resume at the same layout repeats the uninterrupted run bit for bit (with the
recorded placement), a reshaped one to 1e-5; a checkpoint written with offload resumes without it and the
reverse; an async snapshot slower than the next step still holds its own step with offload on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.errors import SpecError
from contract.spec import offload_host_bytes, parse_spec, spec_from_proto, spec_to_proto, spec_warnings
from trainers.checkpoint_format import Manifest, step_dir

from tests.e2e.test_checkpoint import SAVED_AT, TRAINING, only_step, train
from tests.e2e.test_trainer import STEP_LINE, finish, start_rank, write_spec
from orchestrator.launcher.local import free_port

LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1)]
MODEL = {"layers": 4, "hidden_size": 32, "heads": 4, "seq_length": 32}
SUBGROUP = 512  # small, so each rank's partition is cut into many subgroups
NONE = {"mode": "none"}
ALL_CPU = {"mode": "interleaved", "placement": "static", "device_fraction": 0.0, "subgroup_size": SUBGROUP}
MIXED = {"mode": "interleaved", "placement": "static", "device_fraction": 0.5, "subgroup_size": SUBGROUP}
CPU = {"mode": "cpu", "subgroup_size": SUBGROUP}


def with_offload(offload: dict) -> dict:
    return {**TRAINING, "offload": offload}


def run_together(tmp_path: Path, layout: tuple[int, int, int], runs: dict[str, dict]) -> dict[str, tuple[list, str]]:
    """Each named run (its training.offload) at `layout`, all at once, checkpointing every SAVED_AT steps into
    tmp_path/<name>; their losses and rank 0's output."""
    tp, pp, dp = layout
    world = tp * pp * dp
    started = {}
    for name, offload in runs.items():
        spec = write_spec(tmp_path, model=MODEL, parallelism={"tp": tp, "pp": pp, "dp": dp},
                          training=with_offload(offload), checkpoint={"interval": SAVED_AT})
        run_dir = tmp_path / f"run-{name}"
        run_dir.mkdir()
        port = free_port()
        env = {"ROUNDHOUSE_CHECKPOINT_DIR": str(tmp_path / name)}
        started[name] = [start_rank(spec, run_dir, rank, world, port, extra_env=env) for rank in range(world)]
    results = {}
    for name, procs in started.items():
        outcomes = [finish(p) for p in procs]
        for code, _, err in outcomes:
            assert code == 0, f"{name} at {layout}: {err[-3000:]}"
        results[name] = (losses_by_step(outcomes[0][1], name), outcomes[0][1])
    return results


def losses_by_step(stdout: str, name: str) -> list[float]:
    """Rank 0's loss at each step, in step order. A step line printed twice with the same loss is the same
    step (seen once in a full-suite run, when the checkpoint writer's thread and the loop printed at once, before
    trainers/say.py); a step with two different losses fails here, with the lines."""
    seen: dict[int, float] = {}
    for match in STEP_LINE.finditer(stdout):
        step, loss = int(match.group(1)), float(match.group(3))
        assert seen.setdefault(step, loss) == loss, f"{name}: step {step} twice, two losses:\n{stdout[-3000:]}"
    return [seen[step] for step in sorted(seen)]


# -- the trainer -------------------------------------------------------------------------------------------

THREE_PLACEMENTS = {"none": NONE, "all_cpu": ALL_CPU, "mixed": MIXED}
WRITTEN = (1, 1, 2)  # the resume test's layout: its runs are the placement test's at this layout


@pytest.fixture(scope="module")
def runs_at_written_layout(tmp_path_factory) -> tuple[Path, dict[str, tuple[list, str]]]:
    """The three placements at WRITTEN, once for the module: their directory and run_together's results."""
    directory = tmp_path_factory.mktemp("offload-written")
    return directory, run_together(directory, WRITTEN, THREE_PLACEMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
def test_mixed_placement_matches_all_cpu_bit_for_bit_and_no_offload_to_1e_6(tmp_path, layout, request):
    if layout == WRITTEN:
        directory, runs = request.getfixturevalue("runs_at_written_layout")
    else:
        directory, runs = tmp_path, run_together(tmp_path, layout, THREE_PLACEMENTS)
    (none, _), (all_cpu, _), (mixed, out) = runs["none"], runs["all_cpu"], runs["mixed"]
    assert len(mixed) == TRAINING["steps"]
    assert "optimizer state offloaded to host memory (mode interleaved)" in out
    assert mixed == all_cpu, "the device's subgroups get the CPU's arithmetic exactly"
    # torch's AdamW without offload is its unfused kernel; offload runs the fused one: the same formula.
    assert mixed == pytest.approx(none, rel=1e-6, abs=1e-6)
    assert mixed[-1] < mixed[0] - 0.05 and none[-1] < none[0] - 0.05  # it learns, as without offload

    manifest = Manifest.read(step_dir(directory / "mixed", SAVED_AT))
    assert manifest.offload is not None
    ranks = manifest.offload["ranks"]
    assert sorted(ranks, key=int) == [str(r) for r in range(layout[0] * layout[1] * layout[2])]
    for record in ranks.values():
        assert record["mode"] == "interleaved" and record["subgroup_size"] == SUBGROUP
        assert 0 < len(record["on_device"]) < record["subgroups"] and record["slots"] >= 1
    assert Manifest.read(step_dir(directory / "none", SAVED_AT)).offload is None
    all_cpu_ranks = Manifest.read(step_dir(directory / "all_cpu", SAVED_AT)).offload["ranks"]
    assert all(record["on_device"] == [] for record in all_cpu_ranks.values())


@pytest.mark.slow
def test_resumes_same_layout_reshaped_and_with_offload_switched(tmp_path, runs_at_written_layout):
    """Written at (1,1,2) with a mixed placement; resumed there (bit for bit, the recorded placement reused),
    at (2,1,1) (reshaped: to 1e-5), under mode cpu (bit for bit: the same CPU arithmetic) and with offload off
    (to 1e-6); and a checkpoint written without offload resumed with it."""
    written = WRITTEN
    written_dir, runs = runs_at_written_layout
    uninterrupted, plain = runs["mixed"][0], runs["none"][0]

    same, out = train(tmp_path, written, only_step(written_dir / "mixed", SAVED_AT, tmp_path / "same-ckpt"), "same",
                      training=with_offload(MIXED))
    assert f"resuming after step {SAVED_AT}" in out and "(same layout)" in out
    assert "not reused" not in out
    assert same == uninterrupted[SAVED_AT:]

    reshaped, out = train(tmp_path, (2, 1, 1), only_step(written_dir / "mixed", SAVED_AT, tmp_path / "re-ckpt"),
                          "reshaped", training=with_offload(MIXED))
    assert "(reshaped)" in out
    assert reshaped == pytest.approx(uninterrupted[SAVED_AT:], rel=1e-5)

    as_cpu, _ = train(tmp_path, written, only_step(written_dir / "mixed", SAVED_AT, tmp_path / "cpu-ckpt"), "as-cpu",
                      training=with_offload(CPU))
    assert as_cpu == uninterrupted[SAVED_AT:]

    off, _ = train(tmp_path, written, only_step(written_dir / "mixed", SAVED_AT, tmp_path / "off-ckpt"), "off",
                   training=with_offload(NONE))
    assert off == pytest.approx(uninterrupted[SAVED_AT:], rel=1e-6, abs=1e-6)

    on, _ = train(tmp_path, written, only_step(written_dir / "none", SAVED_AT, tmp_path / "on-ckpt"), "on",
                  training=with_offload(MIXED))
    assert on == pytest.approx(plain[SAVED_AT:], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_a_slow_async_snapshot_with_offload_still_holds_its_own_step(tmp_path):
    layout = (1, 1, 2)
    training = with_offload(MIXED)
    uninterrupted, out = train(tmp_path, layout, tmp_path / "full", "full", training=training,
                               checkpoint={"interval": SAVED_AT, "async_save": True},
                               env={"RH_TEST_SNAPSHOT_DELAY": "2"})
    assert "blocked training" in out
    after, out = train(tmp_path, layout, only_step(tmp_path / "full", SAVED_AT, tmp_path / "resume-ckpt"), "resume",
                       training=training)
    assert f"resuming after step {SAVED_AT}" in out
    assert after == uninterrupted[SAVED_AT:]


# -- the spec ----------------------------------------------------------------------------------------------

def spec_with(offload: dict | None = None, **sections) -> dict:
    training = {"offload": offload} if offload is not None else {}
    return {"name": "offload-test", "model": MODEL, "training": training, **sections}


def violations(data: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return {v.field: v.description for v in info.value.violations}


def test_offload_defaults_to_none_and_round_trips_through_the_proto():
    assert parse_spec(spec_with()).training.offload.mode == "none"
    # The contract imports no offload: its section and defaults must be the ranks' settings, field for field.
    import dataclasses

    import offload
    from contract.spec import OffloadSpec

    assert OffloadSpec().model_dump() == dataclasses.asdict(offload.OffloadSettings())
    spec = parse_spec(spec_with({"mode": "interleaved", "placement": "static", "device_fraction": 0.25,
                                 "subgroup_size": 4096, "cpu_threads": 3}))
    assert spec_from_proto(spec_to_proto(spec)) == spec
    plain = parse_spec(spec_with())
    assert spec_from_proto(spec_to_proto(plain)) == plain


@pytest.mark.parametrize(("offload", "field", "words"), [
    ({"mode": "gpu"}, "training.offload.mode", "'none', 'cpu' or 'interleaved'"),
    ({"mode": "interleaved", "subgroup_size": 0}, "training.offload.subgroup_size", "greater than or equal to 1"),
    ({"mode": "interleaved", "placement": "static"}, "training.offload.device_fraction", "required"),
    ({"mode": "interleaved", "placement": "static", "device_fraction": 1.5}, "training.offload.device_fraction",
     "less than or equal to 1"),
    ({"mode": "interleaved", "device_fraction": 0.5}, "training.offload.device_fraction", "only for placement static"),
    ({"mode": "interleaved", "placement": "static", "device_fraction": 0.5, "profile": "h200-pcie5"},
     "training.offload.profile", "only for placement auto"),
    ({"mode": "cpu", "placement": "static", "device_fraction": 0.5}, "training.offload.placement",
     "only for mode interleaved"),
    ({"mode": "interleaved", "profile": "../../etc/profile"}, "training.offload.profile", "a profile's name"),
    ({"mode": "interleaved", "cpu_threads": 0}, "training.offload.cpu_threads", "greater than or equal to 1"),
    ({"mode": "interleaved", "ratio": 0.5}, "training.offload.ratio", "unknown field"),
])
def test_bad_offload_settings_name_the_field(offload, field, words):
    found = violations(spec_with(offload))
    assert field in found, found
    assert words in found[field]


def test_a_warning_when_resources_memory_cannot_hold_the_pinned_state():
    big = {"layers": 24, "hidden_size": 2048, "heads": 16, "seq_length": 1024, "vocab_size": 50304}
    offloaded = parse_spec({"name": "big", "model": big, "training": {"offload": {"mode": "cpu"}},
                            "resources": {"memory": "8Gi"}})
    assert offload_host_bytes(offloaded) > 8 * 2**30  # about 1.3 B parameters, 32 bytes each
    [warning] = spec_warnings(offloaded)
    assert warning.field == "resources.memory" and "pinned per rank" in warning.description
    roomy = parse_spec({**offloaded.model_dump(mode="json"), "resources": {"memory": "64Gi"}})
    assert spec_warnings(roomy) == []
    sharded = parse_spec({"name": "big", "model": big, "parallelism": {"dp": 8},
                          "training": {"offload": {"mode": "cpu"}, "micro_batch_size": 1},
                          "resources": {"memory": "8Gi"}})
    assert spec_warnings(sharded) == []  # dp=8 ranks share the state
    no_offload = parse_spec({"name": "big", "model": big, "resources": {"memory": "8Gi"}})
    assert spec_warnings(no_offload) == []


def test_create_job_records_the_warning_in_the_jobs_first_event(client, api_plane):
    from sqlalchemy import select

    from orchestrator.store import Event
    from roundhouse.v1 import job_service_pb2 as js

    big = {"layers": 24, "hidden_size": 2048, "heads": 16, "seq_length": 1024, "vocab_size": 50304}
    spec = parse_spec({"name": "big", "model": big, "training": {"offload": {"mode": "cpu"}},
                       "resources": {"memory": "8Gi"}})
    created = client.jobs.CreateJob(js.CreateJobRequest(spec=spec_to_proto(spec)), metadata=client.metadata)
    assert created.spec.training.offload.mode == "cpu"
    with api_plane.db.read() as session:
        [message] = session.scalars(select(Event.message).where(Event.job_name == "big")).all()
    assert "warning: spec.resources.memory: 8Gi per rank may not hold the offloaded optimizer state" in message


# -- the planner's commands --------------------------------------------------------------------------------

def write_yaml_spec(tmp_path: Path, **training) -> Path:
    path = tmp_path / "job.yaml"
    big = {"layers": 32, "hidden_size": 4096, "heads": 32, "seq_length": 2048, "vocab_size": 50304}
    path.write_text(json.dumps({"name": "big", "model": big, "parallelism": {"dp": 1},
                                "training": {"precision": "bf16", **training}}))
    return path


def test_offload_plan_reads_a_spec(tmp_path):
    spec = write_yaml_spec(tmp_path, offload={"mode": "interleaved", "profile": "h200-pcie5"})
    result = subprocess.run([sys.executable, "-m", "offload", "plan", "--spec", str(spec)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "machine: h200-pcie5" in result.stdout
    assert "layout tp=1 pp=1 dp=1; weights and gradients at 2 bytes" in result.stdout
    assert "decision: mode interleaved" in result.stdout
    # As the control plane sizes it (contract.sizing): activations estimated from the spec.
    assert "activations estimated from the spec at tp=1 pp=1 dp=1" in result.stdout
    # The spec names no profile: one must be given.
    plain = write_yaml_spec(tmp_path)
    result = subprocess.run([sys.executable, "-m", "offload", "plan", "--spec", str(plain)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "--profile NAME or --measure" in result.stderr


def test_offload_plan_sizes_a_spec_in_its_declared_accelerator_memory(tmp_path):
    path = tmp_path / "job.yaml"
    big = {"layers": 32, "hidden_size": 4096, "heads": 32, "seq_length": 2048, "vocab_size": 50304}
    path.write_text(json.dumps({"name": "big", "model": big, "parallelism": {"tp": 2, "pp": 2},
                                "training": {"precision": "bf16", "micro_batch_size": 1},
                                "resources": {"accelerator_memory": "32Gi"}}))
    result = subprocess.run([sys.executable, "-m", "offload", "plan", "--spec", str(path), "--profile",
                             "h200-pcie5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "device memory from the spec's resources.accelerator_memory: 32Gi per rank" in result.stdout
    assert "device memory 32.0 GiB, usable 28.8 GiB" in result.stdout
    assert "no offload 37.8 GiB -> does NOT fit" in result.stdout  # what the planner says at (2,2,1) too
    assert "decision: mode interleaved" in result.stdout


def test_roundhouse_offload_plan_runs_the_planner_in_its_own_process(tmp_path, capfd):
    from orchestrator.cli import app

    spec = write_yaml_spec(tmp_path)
    result = CliRunner().invoke(app, ["offload", "plan", str(spec), "--profile", "h100-pcie5"])
    assert result.exit_code == 0, result.output
    assert "machine: h100-pcie5" in capfd.readouterr().out  # the subprocess writes to the real stdout
    result = CliRunner().invoke(app, ["offload", "plan", str(spec), "--profile", "nonesuch"])
    assert result.exit_code == 2
