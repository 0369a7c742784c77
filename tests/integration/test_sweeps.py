"""Sweeps without ranks: the sweep spec's validation (each refusal names its field), the grid's trials and their
names, the objective and the choice rule, and the sweep controller's passes on both databases with the jobs'
states set by hand (create-or-adopt by name, max_parallel, the target with the chosen point, cancel cascading)."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import func, select

from contract.errors import SpecError
from contract.sweep import (GridPoint, TrialPlan, choose_best, parse_sweep, point_objectives, sweep_from_proto,
                            sweep_to_proto, trial_objective)
from orchestrator.auth import Principal
from orchestrator.controller import SweepController
from orchestrator.service import AlreadyExists, PermissionDenied, sweeps
from orchestrator.service.jobs import new_job
from orchestrator.store import Database, Job, JobState, Metric, Sweep, SweepState, migrate, utcnow

ALICE = Principal("alice", "user")
BOB = Principal("bob", "user")


def sweep_data(**changes) -> dict:
    data = {
        "name": "lr",
        "proxy": {"model": {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32,
                            "mup": {"base_hidden_size": 32}},
                  "training": {"steps": 20, "eval_interval": 5}},
        "target": {"model": {"layers": 2, "hidden_size": 64, "heads": 2, "seq_length": 32,
                             "mup": {"base_hidden_size": 32}},
                   "training": {"steps": 40}},
        "grid": {"learning_rates": [0.01, 0.003]},
        "objective": {"eval_windows": 2},
    }
    data.update(changes)
    return data


# -- the spec ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "field"), [
    ({"name": "Not_A_Label"}, "name"),
    ({"name": "x" * 49}, "name"),
    ({"proxy": None}, "proxy"),
    ({"proxy": {"model": {"hidden_size": 32, "heads": 2}, "training": {"eval_interval": 5}}}, "proxy.model.mup"),
    ({"target": {"model": {"hidden_size": 64, "heads": 2}}}, "target.model.mup"),
    ({"target": {"model": {"hidden_size": 64, "heads": 2, "mup": {"base_hidden_size": 64}}}},
     "target.model.mup.base_hidden_size"),
    ({"proxy": {"model": {"hidden_size": 32, "heads": 2, "mup": {"base_hidden_size": 32}}}},
     "proxy.training.eval_interval"),
    ({"proxy": {"model": {"hidden_size": 32, "heads": 2, "mup": {"base_hidden_size": 32}, "norm": "x"},
                "training": {"eval_interval": 5}}}, "proxy.model.norm"),
    ({"grid": {}}, "grid.learning_rates"),
    ({"grid": {"learning_rates": [0.01, -1.0]}}, "grid.learning_rates[1]"),
    ({"grid": {"learning_rates": [0.01, 0.01]}}, "grid.learning_rates"),
    ({"grid": {"learning_rates": [20.0]}}, "grid.learning_rates"),  # above the job spec's limit
    ({"grid": {"learning_rates": [0.01], "seeds": [1.5]}}, "grid.seeds[0]"),
    ({"grid": {"learning_rates": [0.01], "hyperparameters": [{"field": "parallelism.tp", "values": [2]}]}},
     "grid.hyperparameters[0].field"),
    ({"grid": {"learning_rates": [0.01], "hyperparameters": [{"field": "training.warmup_steps", "values": [30]}]}},
     "grid.hyperparameters"),  # more warmup than the proxy's steps
    ({"grid": {"learning_rates": [0.01], "momentum": [0.9]}}, "grid.momentum"),
    ({"max_parallel": 0}, "max_parallel"),
    ({"objective": {"eval_windows": 5}}, "objective.eval_windows"),  # the proxy evaluates 4 times
    ({"objective": {"metric": "loss"}}, "objective.metric"),
    ({"budget": 3}, "budget"),
])
def test_a_bad_sweep_is_refused_naming_the_field(changes, field):
    with pytest.raises(SpecError) as raised:
        parse_sweep(sweep_data(**changes))
    assert field in [v.field for v in raised.value.violations], raised.value.violations


def test_a_different_depth_sequence_length_or_vocabulary_is_a_warning_not_a_refusal():
    data = sweep_data()
    data["target"]["model"].update(layers=4, seq_length=64, vocab_size=512)
    _, warnings = parse_sweep(data)
    assert [w.split(":")[0] for w in warnings] == ["model.layers", "model.seq_length", "model.vocab_size"]
    assert parse_sweep(sweep_data())[1] == []


def test_trials_are_the_grid_in_a_fixed_order_with_names_from_the_spec_alone():
    spec, _ = parse_sweep(sweep_data(grid={"learning_rates": [0.01, 0.003], "weight_decays": [0.0, 0.1],
                                           "seeds": [1, 2]}, max_parallel=3))
    trials = spec.trials()
    assert len(trials) == 8 and [t.index for t in trials] == list(range(8))
    assert [(t.point.learning_rate, t.point.weight_decay, t.seed) for t in trials[:3]] == [
        (0.01, 0.0, 1), (0.01, 0.0, 2), (0.01, 0.1, 1)]
    trial = spec.trial_spec(trials[5])
    assert trial.name == "lr-t5" and trial.training.learning_rate == 0.003 and trial.training.weight_decay == 0.0
    assert trial.training.seed == 2 and trial.labels["roundhouse.io/sweep"] == "lr"
    target = spec.target_spec(trials[2].point)
    assert (target.name, target.training.learning_rate, target.training.weight_decay) == ("lr-target", 0.01, 0.1)
    assert target.model.hidden_size == 64 and target.training.steps == 40


def test_the_spec_travels_through_its_message_and_its_stored_form_unchanged():
    spec, _ = parse_sweep(sweep_data(grid={"learning_rates": [0.01], "seeds": [3], "hyperparameters": [
        {"field": "model.mup.output_multiplier", "values": [1.0, 2.0]}]}))
    assert sweep_from_proto(sweep_to_proto(spec))[0].to_dict() == spec.to_dict()
    assert parse_sweep(spec.to_dict())[0].to_dict() == spec.to_dict()


# -- the objective and the choice --------------------------------------------------------------------------


def test_the_objective_averages_the_last_windows_and_anything_not_finite_is_infinite():
    assert trial_objective([9.0, 3.0, 2.0, 1.0], 3) == 2.0
    assert trial_objective([2.0], 3) == 2.0  # fewer evaluations than windows: what there is
    assert trial_objective([], 3) == math.inf
    assert trial_objective([1.0, float("nan")], 2) == math.inf
    assert trial_objective([1.0, None], 2) == math.inf


def point(lr: float) -> GridPoint:
    return GridPoint(lr, 0.0)


def test_the_best_point_has_the_lowest_objective_and_nan_or_failed_counts_as_infinity():
    assert choose_best([(point(0.1), float("nan")), (point(0.01), 3.0), (point(0.001), 2.5)]) == (point(0.001), 2.5)
    assert choose_best([(point(0.1), math.inf), (point(0.01), 3.0)]) == (point(0.01), 3.0)
    assert choose_best([(point(0.1), math.inf), (point(0.01), float("nan"))]) is None
    assert choose_best([]) is None


def test_a_tie_goes_to_the_smaller_learning_rate_whatever_the_grid_order():
    assert choose_best([(point(0.01), 2.0), (point(0.001), 2.0), (point(0.1), 2.0)]) == (point(0.001), 2.0)


def test_a_point_with_seeds_scores_their_mean_and_one_failed_seed_fails_it():
    a, b = point(0.01), point(0.001)
    trials = [(TrialPlan(0, a, 1), 2.0), (TrialPlan(1, a, 2), 4.0), (TrialPlan(2, b, 1), 1.0),
              (TrialPlan(3, b, 2), math.inf)]
    assert point_objectives(trials) == [(a, 3.0), (b, math.inf)]
    assert choose_best(point_objectives(trials)) == (a, 3.0)


# -- the controller on both databases ----------------------------------------------------------------------


class Woken(list):
    def __call__(self, name: str) -> None:
        self.append(name)


def create(db: Database, **changes) -> str:
    spec, warnings = parse_sweep(sweep_data(**changes))
    with db.session() as session:
        return sweeps.create_sweep(session, ALICE, spec, warnings).name


def children(db: Database, sweep: str) -> dict[str, Job]:
    with db.read() as session:
        return {j.name: j for j in session.scalars(select(Job).where(Job.parent == f"sweeps/{sweep}"))}


def finish(db: Database, job: str, state: JobState, val_losses: list[float] = ()) -> None:
    with db.session() as session:
        row = session.get(Job, job)
        row.state = state
        for step, loss in enumerate(val_losses, 1):
            session.add(Metric(job_name=job, attempt=1, rank=0, step=step * 5, val_loss=loss, time=utcnow()))


def sweep_row(db: Database, name: str) -> Sweep:
    with db.read() as session:
        return session.get(Sweep, name)


def test_trials_run_at_most_max_parallel_then_the_best_one_s_point_trains_the_target(db):
    name = create(db, grid={"learning_rates": [0.01, 0.003, 0.001]}, max_parallel=2)
    woken = Woken()
    controller = SweepController(db, woken)
    assert controller.reconcile(name) is not None
    kids = children(db, name)
    assert sorted(kids) == ["lr-t0", "lr-t1"] and woken == ["lr-t0", "lr-t1"]
    assert {(j.kind, j.owner, j.state) for j in kids.values()} == {("Trial", "alice", JobState.QUEUED)}
    assert kids["lr-t1"].spec["training"]["learning_rate"] == 0.003

    controller.reconcile(name)  # nothing changed: nothing is created twice
    assert sorted(children(db, name)) == ["lr-t0", "lr-t1"]

    finish(db, "lr-t0", JobState.SUCCEEDED, [5.0, 3.0, 3.0])  # objective (last 2 windows) 3.0
    controller.reconcile(name)
    assert sorted(children(db, name)) == ["lr-t0", "lr-t1", "lr-t2"]
    finish(db, "lr-t1", JobState.SUCCEEDED, [4.0, 2.5, float("nan")])  # NaN: +inf
    finish(db, "lr-t2", JobState.SUCCEEDED, [9.0, 3.5, 2.5])  # objective 3.0: ties lr-t0, and its lr is smaller
    assert sweep_row(db, name).state == SweepState.TUNING
    controller.reconcile(name)

    row = sweep_row(db, name)
    assert row.state == SweepState.TRAINING_TARGET
    assert (row.best["trial"], row.best["learning_rate"], row.best["objective"]) == (2, 0.001, 3.0)
    target = children(db, name)["lr-target"]
    assert (target.kind, target.spec["training"]["learning_rate"], target.spec["model"]["hidden_size"]) == (
        "Target", 0.001, 64)
    finish(db, "lr-target", JobState.SUCCEEDED)
    assert controller.reconcile(name) is None
    assert sweep_row(db, name).state == SweepState.SUCCEEDED and len(children(db, name)) == 4


def test_a_trial_made_before_a_crash_is_adopted_and_a_stranger_s_job_of_that_name_fails_the_sweep(db):
    name = create(db, max_parallel=1)
    spec, _ = parse_sweep(sweep_row(db, name).spec)
    # What a pass that crashed right after creating trial 0 left behind.
    db.create_job(new_job(spec.trial_spec(spec.trials()[0]), "alice", kind="Trial", parent="sweeps/lr"))
    controller = SweepController(db, Woken())
    controller.reconcile(name)
    assert sorted(children(db, name)) == ["lr-t0"] and sweep_row(db, name).state == SweepState.TUNING

    finish(db, "lr-t0", JobState.SUCCEEDED, [3.0, 3.0])
    db.create_job(new_job(spec.trial_spec(spec.trials()[1]), "bob"))  # bob's own job, named like trial 1
    assert controller.reconcile(name) is None
    row = sweep_row(db, name)
    assert (row.state, row.state_reason) == (SweepState.FAILED, "NameTaken")
    with db.read() as session:
        assert session.get(Job, "lr-t1").parent is None  # untouched


def test_when_no_trial_succeeds_the_sweep_fails_without_a_target(db):
    name = create(db, max_parallel=2)
    controller = SweepController(db, Woken())
    controller.reconcile(name)
    finish(db, "lr-t0", JobState.FAILED)
    finish(db, "lr-t1", JobState.SUCCEEDED, [])  # never evaluated: missing
    controller.reconcile(name)
    row = sweep_row(db, name)
    assert (row.state, row.state_reason) == (SweepState.FAILED, "NoTrialSucceeded")
    assert "lr-target" not in children(db, name)


def test_cancel_cascades_to_the_running_trials_and_ends_once_they_have(db):
    name = create(db, grid={"learning_rates": [0.01, 0.003, 0.001]}, max_parallel=2)
    woken = Woken()
    controller = SweepController(db, woken)
    controller.reconcile(name)
    finish(db, "lr-t0", JobState.SUCCEEDED, [3.0, 3.0])
    with db.session() as session, pytest.raises(PermissionDenied):
        sweeps.cancel_sweep(session, BOB, name)
    with db.session() as session:
        sweeps.cancel_sweep(session, ALICE, name)
    woken.clear()
    assert controller.reconcile(name) is not None
    kids = children(db, name)
    assert woken == ["lr-t1"] and kids["lr-t1"].cancel_requested and not kids["lr-t0"].cancel_requested
    assert "lr-t2" not in kids  # no new trial after a cancel
    finish(db, "lr-t1", JobState.CANCELLED)
    assert controller.reconcile(name) is None
    assert sweep_row(db, name).state == SweepState.CANCELLED and "lr-t2" not in children(db, name)


def test_a_sweep_whose_names_are_taken_is_refused_and_nothing_is_written(db):
    create(db)
    spec, warnings = parse_sweep(sweep_data())
    with db.session() as session, pytest.raises(AlreadyExists, match="sweeps/lr"):
        sweeps.create_sweep(session, ALICE, spec, warnings)
    db.create_job(new_job(parse_sweep(sweep_data(name="other"))[0].target_spec(point(0.01)), "bob"))
    spec, warnings = parse_sweep(sweep_data(name="other"))
    with db.session() as session, pytest.raises(AlreadyExists, match="jobs/other-target"):
        sweeps.create_sweep(session, ALICE, spec, warnings)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Sweep)) == 1


# -- the API and the dashboard (a control plane that launches nothing) ----------------------------------------


def test_the_sweep_service_creates_gets_lists_cancels_and_refuses_with_the_field_named(client, api_plane):
    import grpc
    import httpx

    from contract.sweep import sweep_to_proto
    from roundhouse.v1 import sweep_pb2, sweep_service_pb2 as ss, sweep_service_pb2_grpc

    stub = sweep_service_pb2_grpc.SweepServiceStub(client.channel)
    spec, _ = parse_sweep(sweep_data(target={"model": {"layers": 4, "hidden_size": 64, "heads": 2,
                                                       "mup": {"base_hidden_size": 32}}}))
    created = stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)), metadata=client.metadata)
    assert (created.name, created.state, created.owner) == ("sweeps/lr", sweep_pb2.SWEEP_STATE_TUNING, "admin")
    assert [t.job for t in created.trials] == ["jobs/lr-t0", "jobs/lr-t1"]
    assert not created.trials[0].HasField("objective") and created.trials[0].state == 0  # not created yet
    assert created.warnings and created.warnings[0].startswith("model.layers")
    assert created.spec.grid.learning_rates == [0.01, 0.003] and created.spec.objective.eval_windows == 2

    with pytest.raises(grpc.RpcError) as again:
        stub.CreateSweep(ss.CreateSweepRequest(spec=sweep_to_proto(spec)), metadata=client.metadata)
    assert again.value.code() is grpc.StatusCode.ALREADY_EXISTS

    bad = sweep_to_proto(parse_sweep(sweep_data(name="bad"))[0])
    bad.target.model.mup.base_hidden_size = 64
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateSweep(ss.CreateSweepRequest(spec=bad), metadata=client.metadata)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.target.model.mup.base_hidden_size" in refused.value.details()

    listed = stub.ListSweeps(ss.ListSweepsRequest(), metadata=client.metadata).sweeps
    assert [s.name for s in listed] == ["sweeps/lr"]  # the refused one wrote nothing
    assert stub.GetSweep(ss.GetSweepRequest(name="lr"), metadata=client.metadata).uid == created.uid
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetSweep(ss.GetSweepRequest(name="sweeps/nope"), metadata=client.metadata)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND

    base = f"http://127.0.0.1:{api_plane.http_port}"
    headers = {"authorization": f"Bearer {client.token}"}
    detail = httpx.get(f"{base}/api/sweeps/lr", headers=headers).json()
    assert (detail["sweep"]["state"], detail["proxy_width"], detail["target_width"]) == ("TUNING", 32, 64)
    assert [t["job"] for t in detail["trials"]] == ["lr-t0", "lr-t1"] and detail["can_cancel"]
    assert httpx.get(f"{base}/sweeps/lr", headers=headers).status_code == 200
    assert httpx.get(f"{base}/sweeps/nope", headers=headers).status_code == 404
    assert [s["name"] for s in httpx.get(f"{base}/api/sweeps", headers=headers).json()["sweeps"]] == ["lr"]

    watch = stub.WatchSweep(ss.WatchSweepRequest(name="lr"), metadata=client.metadata)  # a stream on the loop
    assert next(watch).uid == created.uid
    cancelled = stub.CancelSweep(ss.CancelSweepRequest(name="sweeps/lr"), metadata=client.metadata)
    assert cancelled.cancel_requested and cancelled.state_reason == "CancelRequested"
    assert next(watch).cancel_requested  # the change, as it happened
    watch.cancel()
    with pytest.raises(grpc.RpcError) as unknown:
        next(stub.WatchSweep(ss.WatchSweepRequest(name="nope"), metadata=client.metadata))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


# -- the CLI -----------------------------------------------------------------------------------------------


def test_the_example_sweep_file_is_valid_and_costs_under_five_percent_of_the_target():
    from contract.sweep import load_sweep_file, model_flops

    spec, warnings = load_sweep_file("examples/mup-sweep.yaml")
    assert warnings == [] and len(spec.trials()) == 5
    trials = sum(model_flops(spec.proxy, spec.proxy.training.steps) for _ in spec.trials())
    assert trials / model_flops(spec.target, spec.target.training.steps) < 0.05


def test_sweep_submit_refuses_a_bad_file_locally_naming_each_field(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.cli import sweeps as cli

    def refuse(server, token, tls_ca=None):
        raise AssertionError("the command contacted the server")
    monkeypatch.setattr(cli, "connect", refuse)
    data = sweep_data(max_parallel=0)
    data["target"]["model"]["mup"]["base_hidden_size"] = 64
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["sweep", "submit", str(path)], env={"ROUNDHOUSE_SERVER": None})
    assert result.exit_code == 2, result.output
    assert "max_parallel: 0 must be an integer in [1, 999]" in result.output
