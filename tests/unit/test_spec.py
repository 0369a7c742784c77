"""Validation of the job spec at the edge: every bad input is refused with the field's path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from contract.sweep import load_sweep_file
from contract.spec import SpecError, load_spec_file, parse_spec, spec_from_json, spec_from_proto, spec_to_proto

EXAMPLES = Path(__file__).parents[2] / "examples"

VALID = {
    "name": "tiny",
    "labels": {"team": "infra", "roundhouse.io/purpose": "test"},
    "model": {"layers": 4, "hidden_size": 64, "heads": 4, "seq_length": 32, "vocab_size": 256},
    "parallelism": {"tp": 2, "pp": 2, "dp": 2},
    "training": {"steps": 10, "global_batch_size": 16, "micro_batch_size": 2},
    "resources": {"ranks": 8},
}


def with_change(path: str, value):
    data = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return data


# (a change to the valid spec, the field the error must name)
BAD_INPUTS = [
    pytest.param(with_change("resources.ranks", 6), "resources.ranks", id="tp*pp*dp != ranks"),
    pytest.param(with_change("parallelism.tp", 8) | {"resources": {"ranks": 32}}, "model.heads",
                 id="heads not divisible by tp"),
    pytest.param(with_change("model.layers", 3), "model.layers", id="layers not divisible by pp"),
    pytest.param(with_change("training.global_batch_size", 10), "training.global_batch_size",
                 id="global batch not divisible by micro*dp"),
    pytest.param(with_change("model.hidden_size", 0), "model.hidden_size", id="zero size"),
    pytest.param(with_change("model.heads", -4), "model.heads", id="negative size"),
    pytest.param(with_change("training.steps", 0), "training.steps", id="zero steps"),
    pytest.param(with_change("training.learning_rate", -1.0), "training.learning_rate", id="negative lr"),
    pytest.param(with_change("parallelism.dp", 0), "parallelism.dp", id="zero dp"),
    pytest.param(with_change("training.steps", 10**12), "training.steps", id="absurd steps"),
    pytest.param(with_change("model.layers", 10**12), "model.layers", id="absurd layers"),
    pytest.param(with_change("model.hidden_size", 10**9), "model.hidden_size", id="absurd hidden size"),
    pytest.param(with_change("model.dropout", 0.1), "model.dropout", id="unknown nested field"),
    pytest.param(VALID | {"optimizer": "sgd"}, "optimizer", id="unknown top-level field"),
    pytest.param(VALID | {"name": "Tiny_GPT"}, "name", id="name not a label (case, underscore)"),
    pytest.param(VALID | {"name": "-tiny"}, "name", id="name starts with dash"),
    pytest.param(VALID | {"name": "x" * 64}, "name", id="name too long"),
    pytest.param({k: v for k, v in VALID.items() if k != "name"}, "name", id="name missing"),
    pytest.param(with_change("training.lr_schedule", "exponential"), "training.lr_schedule", id="unknown schedule"),
    pytest.param(with_change("env.RANK", "3"), "env.RANK", id="reserved env"),
    pytest.param(with_change("labels.bad key", "x"), "labels.bad key", id="bad label key"),
    pytest.param(with_change("training.warmup_steps", 11), "training.warmup_steps", id="warmup beyond steps"),
    pytest.param(with_change("model.positions", "rotary") | {"model": {**VALID["model"], "hidden_size": 36,
                                                                         "positions": "rotary"}},
                 "model.positions", id="rotary with an odd head size"),
    pytest.param(with_change("model.norm", "batchnorm"), "model.norm", id="unknown norm"),
    pytest.param(with_change("resources.memory", "16 GB"), "resources.memory", id="not a quantity"),
    pytest.param(with_change("resources.gpus", -1), "resources.gpus", id="negative gpus"),
    pytest.param(with_change("kubernetes.tolerations", [{"key": "a", "operator": "In"}]),
                 "kubernetes.tolerations.0.operator", id="unknown toleration operator"),
    pytest.param(with_change("kubernetes.node_selector", {"pool": "has space"}), "kubernetes.node_selector.pool",
                 id="node selector value not a label value"),
    pytest.param(with_change("kubernetes.volume_claim", "Data_Set"), "kubernetes.volume_claim",
                 id="claim not a DNS name"),
    pytest.param(VALID | {"name": "tiny\n"}, "name", id="name with a trailing newline"),
    pytest.param(with_change("checkpoint.directory", "/var/lib/roundhouse/jobs/other/checkpoints"),
                 "checkpoint.directory", id="absolute checkpoint directory"),
    pytest.param(with_change("checkpoint.directory", "../other-job/checkpoints"), "checkpoint.directory",
                 id="checkpoint directory escaping with .."),
    pytest.param(with_change("checkpoint.directory", "ckpt/../../other-job"), "checkpoint.directory",
                 id="checkpoint directory escaping from inside"),
    pytest.param(with_change("checkpoint.directory", "."), "checkpoint.directory",
                 id="checkpoint directory that is the job directory itself"),
    pytest.param(with_change("env.A\0B", "x"), "env.A\0B", id="env name with NUL"),
    pytest.param(with_change("env.OK", "a\0b"), "env.OK", id="env value with NUL"),
    # Bounds: sizes no real job reaches, and inputs a shared server must not store, list and copy.
    pytest.param(with_change("env.BIG", "x" * 4097), "env.BIG", id="env value over 4 KiB"),
    pytest.param(VALID | {"env": {f"V{i}": "x" for i in range(65)}}, "env", id="more than 64 env entries"),
    pytest.param(VALID | {"env": {f"V{i}": "x" * 4000 for i in range(9)}}, "env", id="env over 32 KiB in all"),
    pytest.param(VALID | {"labels": {f"k{i}": "v" for i in range(65)}}, "labels", id="more than 64 labels"),
    pytest.param(with_change("model.hidden_size", 131072) | {"parallelism": {}, "resources": {}},
                 "model.hidden_size", id="hidden size 131072"),
    pytest.param(with_change("resources.gpus", 64), "resources.gpus", id="64 GPUs per rank"),
    pytest.param(VALID | {"model": {**VALID["model"], "heads": 64}, "parallelism": {"tp": 64, "pp": 4, "dp": 64},
                          "training": {"steps": 10, "global_batch_size": 64, "micro_batch_size": 1},
                          "resources": {}}, "parallelism", id="16384 ranks"),
    pytest.param(VALID | {"model": {"layers": 512, "hidden_size": 65536, "heads": 512}, "parallelism": {},
                          "resources": {}}, "model", id="tens of trillions of parameters"),
    # Full matches: a trailing newline (or any control character) is refused wherever a name or path goes.
    pytest.param(VALID | {"labels": {"team\n": "infra"}}, "labels.team\n", id="label key with a trailing newline"),
    pytest.param(VALID | {"labels": {"team": "infra\n"}}, "labels.team", id="label value with a trailing newline"),
    pytest.param(with_change("kubernetes.node_selector", {"pool": "gpu\n"}), "kubernetes.node_selector.pool",
                 id="node selector value with a trailing newline"),
    pytest.param(with_change("env.FOO\n", "x"), "env.FOO\n", id="env name with a trailing newline"),
    pytest.param(with_change("resources.memory", "16Gi\n"), "resources.memory", id="quantity with a newline"),
    pytest.param(with_change("kubernetes.volume_claim", "data\n"), "kubernetes.volume_claim",
                 id="claim with a trailing newline"),
    pytest.param(with_change("kubernetes.priority_class", "high\n"), "kubernetes.priority_class",
                 id="priority class with a trailing newline"),
    pytest.param(with_change("kubernetes.image", "reg.example/t:1\n"), "kubernetes.image",
                 id="image with a trailing newline"),
    pytest.param(with_change("kubernetes.image", "x" * 513), "kubernetes.image", id="image too long"),
    pytest.param(with_change("kubernetes.tolerations", [{"key": "gpu\n", "operator": "Exists"}]),
                 "kubernetes.tolerations.0", id="toleration key with a trailing newline"),
    pytest.param(with_change("data.path", "corpus\n.txt"), "data.path", id="data path with a newline"),
    pytest.param(with_change("checkpoint.directory", "ckpt\n"), "checkpoint.directory",
                 id="checkpoint directory with a newline"),
    pytest.param(with_change("training.offload", {"mode": "interleaved", "profile": "h200\n"}),
                 "training.offload.profile", id="profile with a trailing newline"),
]

# Values of the wrong type: refused, never converted (YAML's `true`, a quoted number). Not on the wire: the
# proto's own types hold them there.
WRONG_TYPES = [
    pytest.param(with_change("training.steps", True), "training.steps", id="steps: true"),
    pytest.param(with_change("training.steps", "100"), "training.steps", id="steps as a string"),
    pytest.param(with_change("training.steps", 100.0), "training.steps", id="steps as a float"),
    pytest.param(with_change("training.learning_rate", "0.1"), "training.learning_rate", id="a rate as a string"),
    pytest.param(with_change("training.learning_rate", True), "training.learning_rate", id="a rate as a bool"),
    pytest.param(with_change("checkpoint.async_save", "yes"), "checkpoint.async_save", id="a bool as a string"),
    pytest.param(with_change("checkpoint.async_save", 1), "checkpoint.async_save", id="a bool as a number"),
    pytest.param(with_change("env.DEBUG", 1), "env.DEBUG", id="env value as a number"),
    pytest.param(with_change("labels.size", 3), "labels.size", id="label value as a number"),
    pytest.param(VALID | {"name": 7}, "name", id="name as a number"),
]

# Names a spec's env may not set: the launcher's, the loader's, the interpreter's and shell's, proxies, ours,
# in any case; and names that are not plain variable names (a trailing newline included).
REFUSED_ENV_NAMES = [
    "LD_PRELOAD", "LD_LIBRARY_PATH", "ld_preload", "Ld_Audit", "DYLD_INSERT_LIBRARIES", "GCONV_PATH",
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "pythonpath", "PythonUserBase", "PATH", "path", "HOME",
    "BASH_ENV", "ENV", "env", "SHELLOPTS", "TORCH_EXTENSIONS_DIR",
    "HTTP_PROXY", "https_proxy", "ALL_PROXY", "NO_PROXY", "grpc_proxy", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "ROUNDHOUSE_JOB_TOKEN", "roundhouse_test_hooks", "ROUNDHOUSE_CHECKPOINT_DIR", "RANK", "master_addr",
    "NODE_RANK", "PET_NPROC_PER_NODE", "TORCHELASTIC_RUN_ID",
    "FOO\n", "1FOO", "A-B", "A B", "", "X" * 129,
]
ALLOWED_ENV_NAMES = ["NCCL_DEBUG", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "my_setting", "_X", "RH_FAULT_RANK",
                     "RH_TEST_STEP_SLEEP"]


def test_valid_spec_is_accepted_and_filled_in():
    spec = parse_spec(VALID)
    assert spec.world_size == 8
    assert spec.training.lr_schedule == "cosine"  # a default
    assert spec.restart_policy.max_restarts == 0


def test_ranks_default_to_layout_size():
    spec = parse_spec({"name": "x", "parallelism": {"dp": 2}, "training": {"global_batch_size": 8,
                                                                           "micro_batch_size": 4}})
    assert spec.resources.ranks == 2


@pytest.mark.parametrize(("data", "field"), BAD_INPUTS)
def test_bad_input_names_the_field(data, field):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert field in [v.field for v in info.value.violations], info.value.violations


@pytest.mark.parametrize(("data", "field"), WRONG_TYPES)
def test_values_of_the_wrong_type_are_refused_not_converted(data, field):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert field in [v.field for v in info.value.violations], info.value.violations


def test_a_float_field_takes_an_integer():
    assert parse_spec(with_change("training.learning_rate", 1)).training.learning_rate == 1.0


def test_bounds_at_their_limit_are_accepted():
    spec = parse_spec(VALID | {"env": {f"V{i}": "x" * 500 for i in range(64)},
                               "labels": {f"k{i}": "v" for i in range(64)}})
    assert len(spec.env) == 64 and len(spec.labels) == 64
    assert parse_spec(with_change("env.BIG", "x" * 4096)).env["BIG"] == "x" * 4096


def test_an_overlong_input_is_not_echoed_whole():
    with pytest.raises(SpecError) as info:
        parse_spec(with_change(f"env.{'A' * 100_000}", "x"))
    assert all(len(v.field) <= 200 and len(v.description) <= 500 for v in info.value.violations)
    assert len(str(info.value)) < 2000


def test_every_violation_is_reported_at_once():
    data = with_change("model.layers", 3)
    data["training"]["global_batch_size"] = 10
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert {"model.layers", "training.global_batch_size"} <= {v.field for v in info.value.violations}


def test_proto_round_trip_keeps_every_field():
    spec = parse_spec(VALID)
    assert spec_from_proto(spec_to_proto(spec)) == spec


def test_proto_round_trip_keeps_the_kubernetes_section():
    spec = parse_spec(VALID | {"resources": {"ranks": 8, "cpu": "500m", "memory": "4Gi", "gpus": 1},
                               "kubernetes": {"image": "reg.example/t:1", "volume_claim": "data",
                                              "node_selector": {"pool": "gpu"}, "priority_class": "high",
                                              "queue": "team-a",
                                              "tolerations": [{"key": "gpu", "operator": "Exists"},
                                                              {"key": "k", "value": "v", "effect": "NoSchedule"}]}})
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert spec.kubernetes.tolerations[1].operator == "Equal"


def test_secret_references_round_trip_and_are_checked_by_their_whole_name():
    refs = {"WANDB_API_KEY": {"name": "wandb", "key": "api-key"}, "HF_TOKEN": {"name": "hf.tokens", "key": "t_1"}}
    spec = parse_spec(VALID | {"kubernetes": {"env_from_secrets": refs}})
    assert spec_from_proto(spec_to_proto(spec)) == spec == spec_from_json(spec.model_dump_json())
    for refs, field in [
        ({"X": {"name": "wandb\n", "key": "k"}}, "kubernetes.env_from_secrets.X.name"),
        ({"X": {"name": "Wandb", "key": "k"}}, "kubernetes.env_from_secrets.X.name"),
        ({"X": {"name": "w", "key": "a/b"}}, "kubernetes.env_from_secrets.X.key"),
        ({"X": {"name": "w"}}, "kubernetes.env_from_secrets.X.key"),
        ({"LD_PRELOAD": {"name": "w", "key": "k"}}, "kubernetes.env_from_secrets.LD_PRELOAD"),
        ({"RH_FAULT_EXIT": {"name": "w", "key": "k"}}, "kubernetes.env_from_secrets.RH_FAULT_EXIT"),
        ({f"X{i}": {"name": "w", "key": "k"} for i in range(65)}, "kubernetes.env_from_secrets"),
    ]:
        with pytest.raises(SpecError) as info:
            parse_spec(VALID | {"kubernetes": {"env_from_secrets": refs}})
        assert [v.field for v in info.value.violations] == [field]
    with pytest.raises(SpecError) as info:  # one variable, one source
        parse_spec(VALID | {"env": {"X": "1"}, "kubernetes": {"env_from_secrets": {"X": {"name": "w", "key": "k"}}}})
    assert [v.field for v in info.value.violations] == ["kubernetes.env_from_secrets.X"]
    message = spec_to_proto(parse_spec({"name": "x"}))
    message.kubernetes.env_from_secrets["X"].name = "w"  # the key left out
    with pytest.raises(SpecError) as info:
        spec_from_proto(message)
    assert [v.field for v in info.value.violations] == ["kubernetes.env_from_secrets.X.key"]


def test_explicit_zero_in_proto_is_rejected_not_defaulted():
    message = spec_to_proto(parse_spec({"name": "x"}))
    message.training.steps = 0
    with pytest.raises(SpecError) as info:
        spec_from_proto(message)
    assert [v.field for v in info.value.violations] == ["training.steps"]


def test_unknown_proto_fields_are_rejected():
    message = spec_to_proto(parse_spec({"name": "x"}))
    # Field 99 of ModelSpec does not exist in this server's schema: a newer client's field.
    raw = message.SerializeToString() + b"\x1a\x03\xf8\x06\x01"  # model (3): { field 111, varint 1 }
    parsed = type(message).FromString(raw)
    with pytest.raises(SpecError) as info:
        spec_from_proto(parsed)
    assert [v.field for v in info.value.violations] == ["model.#111"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    if "sweep" in path.name:  # a sweep file: two job specs and a grid, through the sweep's own gate
        load_sweep_file(str(path))
    else:
        load_spec_file(str(path))


@pytest.mark.parametrize("name", REFUSED_ENV_NAMES)
def test_refused_env_names_are_refused_at_the_env_field(name):
    with pytest.raises(SpecError) as info:
        parse_spec(VALID | {"env": {name: "1"}})
    assert [v.field for v in info.value.violations] == [f"env.{name}"]


@pytest.mark.parametrize("name", ALLOWED_ENV_NAMES)
def test_ordinary_env_names_pass(name):
    # Test hooks pass the spec gate; a server not started for tests refuses them (contract.reach).
    assert parse_spec(VALID | {"env": {name: "1"}}).env == {name: "1"}


def test_a_relative_checkpoint_subdirectory_is_accepted():
    assert parse_spec(with_change("checkpoint.directory", "runs/ckpt")).checkpoint.directory == "runs/ckpt"


def test_the_rank_reads_the_spec_the_control_plane_wrote():
    spec = parse_spec(VALID)
    assert spec_from_json(spec.model_dump_json()) == spec
    with pytest.raises(SpecError) as info:
        spec_from_json(spec.model_dump_json().replace('"layers":4', '"layers":3'))
    assert "model.layers" in [v.field for v in info.value.violations]
