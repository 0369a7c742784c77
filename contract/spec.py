"""The job spec: what users write as YAML and send as a `roundhouse.v1.JobSpec` message.

`parse_spec` is the one gate every spec passes through (CLI, gRPC, tests). It returns a normalised spec with
every default filled in, or raises `SpecError` listing each offending field by its path and a reason, so
callers can reject a request before anything is written.
"""

from __future__ import annotations

import functools
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from contract.errors import FieldViolation, SpecError
from contract.layout import MAX_RANKS, Layout, layout_violations
from contract.sizing import (OFFLOAD_STATE_BYTES, approximate_parameters, fit_at, offload_mode_for,
                             parse_quantity, pinned_host_bytes, weight_bytes_of)
from contract.yaml_file import load_yaml_file
from roundhouse.v1 import job_pb2

# Every pattern below is used with `fullmatch`: a pattern ending in "$" would accept a trailing newline, and a
# name that differs from another only by one ("nl-test\n") must not exist.
# RFC 1123 label: the name must also be usable for Kubernetes objects (Jobs, Services, pods).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Kubernetes label keys ("prefix/name") and values.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
# A container image reference: registry/path:tag or @digest, in the characters such references use.
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")
# What a spec's `env` may name: a conventional variable name, at most 128 characters, and none of the refused
# names below.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Control characters (a newline among them) have no place in a path or a name a user types.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Names a spec may not set, compared upper-cased (a lower-case `ld_preload` is refused like `LD_PRELOAD`):
# what the launcher sets for every rank (contract.rank_env); what steers the dynamic loader, the
# interpreter or the shell before the trainer's first line runs; proxies, which would route the rank's
# calls to the control plane (its credential included) elsewhere; and anything of Roundhouse's own.
REFUSED_ENV = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "PATH", "HOME", "SHELL", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "IFS", "PS4", "CDPATH",
    "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "NIS_PATH", "NLSPATH",
    "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR", "TORCH_EXTENSIONS_DIR", "PERL5LIB", "PERL5OPT", "RUBYOPT",
    "NODE_OPTIONS",
})
REFUSED_ENV_PREFIXES = ("LD_", "DYLD_", "MALLOC_", "PYTHON", "BASH_FUNC_", "GRPC_", "ROUNDHOUSE_",
                        "TORCHELASTIC_", "PET_")
REFUSED_ENV_SUFFIXES = ("_PROXY",)
# The trainer's test hooks (trainers.env.TestHooks): refused at CreateJob unless the server was started for
# tests, and honoured by a rank only when its launcher says test hooks are on.
TEST_HOOK_PREFIXES = ("RH_FAULT_", "RH_TEST_")
# A spec is stored, listed, copied into every rank's environment and (on Kubernetes) into a Secret: its `env`
# is bounded in entries, per value and in all.
MAX_ENV_ENTRIES = 64
MAX_ENV_VALUE = 4 * 1024
MAX_ENV_TOTAL = 32 * 1024  # names and values together
# What a caller who may not read a job's env values sees in their place (orchestrator/service/access.py). Refused
# as a value, so a spec copied from such a view cannot be submitted with the placeholder standing in for a secret.
REDACTED_ENV_VALUE = "<redacted>"
MAX_LABELS = 64
MAX_PATH = 4096
MAX_NAME = 63

# Upper bounds that no real job reaches; past them a number is a typo, not a plan.
MAX_LAYERS = 512
MAX_HIDDEN = 1 << 16
MAX_HEADS = 1024
MAX_SEQ = 1 << 20
MAX_VOCAB = 1 << 20
MAX_PARAMETERS = 10**13  # approximate_parameters: ten trillion
MAX_GPUS_PER_RANK = 16
MAX_PARALLEL = MAX_RANKS
MAX_STEPS = 10**8
MAX_BATCH = 1 << 24
MAX_RESTARTS = 1000
BYTE_VOCAB = 256


def _full_match(pattern: re.Pattern, what: str) -> AfterValidator:
    """A string check: the whole value matches `pattern` (its length is bounded before this runs)."""
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value
    return AfterValidator(check)


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("may not contain control characters (a newline, a tab, NUL)")
    return value


DnsSubdomain = Annotated[str, Field(max_length=253), _full_match(
    _DNS_SUBDOMAIN, "a DNS subdomain: lower-case letters, digits, '-' and '.', starting and ending with a letter "
                    "or digit, at most 253 characters")]
Quantity = Annotated[str, Field(max_length=32), _full_match(
    _QUANTITY, "a Kubernetes quantity such as 4, 500m, 16Gi or 1.5G")]
PathText = Annotated[str, Field(max_length=MAX_PATH), AfterValidator(_no_control_characters)]


class _Section(BaseModel):
    # strict: a value of the wrong type is refused, never converted (`steps: true` is not 1, `"8"` not 8);
    # a float field still takes an integer.
    model_config = ConfigDict(extra="forbid", strict=True)


class MupSpec(_Section):
    """µP (trainers.mup): hyperparameters tuned at the base width transfer to wider models."""

    base_hidden_size: int = Field(ge=1, le=MAX_HIDDEN)  # the width the hyperparameters were tuned at
    base_head_dim: int | None = Field(None, ge=1, le=MAX_HIDDEN)  # None: base_hidden_size / model.heads
    output_multiplier: float = Field(1.0, gt=0, le=1e4)  # logits × output_multiplier / (width / base)
    attention_multiplier: float = Field(1.0, gt=0, le=1e4)
    zero_init_readout: bool = False
    # Weight decay of matrix-like weights ∝ width^e: 1 keeps η·λ constant (the default), 0.5 and 0 allowed.
    weight_decay_exponent: float = Field(1.0, ge=0, le=1)
    # The diagnostic: rank 0 reports each matrix's top singular value every this many steps (and at the last
    # step) as metrics; 0: never. It changes nothing in training, so a checkpoint does not record it.
    sigma_every_steps: int = Field(50, ge=0, le=MAX_STEPS)


class ModelSpec(_Section):
    layers: int = Field(2, ge=1, le=MAX_LAYERS)
    hidden_size: int = Field(64, ge=1, le=MAX_HIDDEN)
    heads: int = Field(4, ge=1, le=MAX_HEADS)
    seq_length: int = Field(64, ge=1, le=MAX_SEQ)
    vocab_size: int = Field(BYTE_VOCAB, ge=BYTE_VOCAB, le=MAX_VOCAB)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    positions: Literal["learned", "rotary"] = "learned"
    mup: MupSpec | None = None  # None: the standard parametrization


class ParallelismSpec(_Section):
    tp: int = Field(1, ge=1, le=MAX_PARALLEL)
    pp: int = Field(1, ge=1, le=MAX_PARALLEL)
    dp: int = Field(1, ge=1, le=MAX_PARALLEL)

    @property
    def layout(self) -> Layout:
        return Layout(self.tp, self.pp, self.dp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


OFFLOAD_MODES = ("none", "cpu", "interleaved")
DEFAULT_SUBGROUP_SIZE = 10_000_000  # offload.subgroups.DEFAULT_SUBGROUP_SIZE (the contract imports no offload)
MAX_SUBGROUP_SIZE = 1 << 34
MAX_CPU_THREADS = 4096
_PROFILE_NAME = re.compile(r"[a-z0-9]([-a-z0-9_]*[a-z0-9])?")  # a name, never a path


class OffloadSpec(_Section):
    """Optimizer-state offloading (offload/, docs/offload.md): the state in host memory, updated by the CPU
    ("cpu", DeepSpeed's ZeRO-1 offload) or by the CPU and the accelerator together ("interleaved")."""

    mode: Literal["none", "cpu", "interleaved"] = "none"
    subgroup_size: int = Field(DEFAULT_SUBGROUP_SIZE, ge=1, le=MAX_SUBGROUP_SIZE)  # elements per subgroup
    # auto: the performance model picks which subgroups the accelerator updates; static: device_fraction of them.
    placement: Literal["auto", "static"] = "auto"
    device_fraction: float | None = Field(None, ge=0, le=1)  # placement static only
    cpu_threads: int | None = Field(None, ge=1, le=MAX_CPU_THREADS)  # None: the cores the rank may run on
    # placement auto: plan from this known machine profile (`python -m offload profiles`) instead of measuring
    # the machine at start-up.
    profile: Annotated[str, Field(max_length=63), _full_match(
        _PROFILE_NAME, "a profile's name: lower-case letters, digits, '-' and '_'")] | None = None


class TrainingSpec(_Section):
    steps: int = Field(100, ge=1, le=MAX_STEPS)
    global_batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    micro_batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    seed: int = Field(1234, ge=0, le=2**63 - 1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    eval_interval: int = Field(0, ge=0, le=MAX_STEPS)
    # bf16: DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights in ZeRO's optimizer).
    precision: Literal["fp32", "bf16"] = "fp32"
    offload: OffloadSpec = Field(default_factory=OffloadSpec)


class DataSpec(_Section):
    # A text file or directory, or a prepared dataset, inside one of the server's data roots (checked at
    # CreateJob by contract.reach, and again by the rank); None: the built-in corpus.
    path: PathText | None = None


class ResourcesSpec(_Section):
    ranks: int | None = Field(None, ge=1, le=MAX_PARALLEL)  # the most; must equal tp*pp*dp
    min_ranks: int | None = Field(None, ge=1, le=MAX_PARALLEL)  # the fewest a restart may reshape down to
    # Per rank (one rank per pod) on Kubernetes, as quantities; requests equal limits.
    cpu: Quantity | None = None
    memory: Quantity | None = None
    gpus: int = Field(0, ge=0, le=MAX_GPUS_PER_RANK)  # nvidia.com/gpu
    # Per rank, the accelerator memory its share of the model may use. With it the planner sizes each layout
    # (contract.sizing): a layout where the model does not fit even with its optimizer state offloaded is never
    # chosen, and one where it fits only offloaded runs with training.offload.mode interleaved.
    accelerator_memory: Quantity | None = None


class Toleration(_Section):
    key: str | None = Field(None, max_length=317)  # a label key (checked with the labels)
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(None, max_length=63)  # a label value
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


# A key of a Secret's data (what Kubernetes allows: letters, digits, '-', '_' and '.').
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
MAX_SECRET_REFS = 64


class SecretKeyRef(_Section):
    """One key of a Kubernetes Secret in the job's namespace: an env value the control plane never holds."""

    name: DnsSubdomain
    key: Annotated[str, Field(max_length=253), _full_match(
        _SECRET_KEY, "a Secret key: letters, digits, '-', '_' and '.', at most 253 characters")]


class KubernetesSpec(_Section):
    """Where and how the ranks run as pods; only the Kubernetes launcher reads it."""

    image: Annotated[str, Field(max_length=512), _full_match(
        _IMAGE, "an image reference (registry/repository:tag or @digest)")] | None = None  # None: the default
    # A PersistentVolumeClaim for data and checkpoints; None: the control plane's default.
    volume_claim: DnsSubdomain | None = None
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_LABELS)
    priority_class: DnsSubdomain | None = None
    queue: DnsSubdomain | None = None  # a Kueue LocalQueue
    # Ranks in one pod (one pod per node: the GPUs of a node, so NCCL stays inside it), started there by
    # torchrun; an attempt whose world size it does not divide uses their greatest common divisor.
    ranks_per_pod: int = Field(1, ge=1, le=64)
    # Env names to Secret keys, set in every rank's container as `valueFrom.secretKeyRef` (the value stays in
    # the cluster: not in the spec, the database or the attempt's Secret). Names follow `env`'s rules.
    env_from_secrets: dict[str, SecretKeyRef] = Field(default_factory=dict, max_length=MAX_SECRET_REFS)


class RestartPolicy(_Section):
    max_restarts: int = Field(0, ge=0, le=MAX_RESTARTS)  # after crashes
    max_hang_restarts: int = Field(0, ge=0, le=MAX_RESTARTS)
    max_preemptions: int = Field(10, ge=0, le=MAX_RESTARTS)  # not the job's fault: a generous default
    hang_timeout_seconds: float = Field(300.0, gt=0, le=7 * 24 * 3600)


class CheckpointSpec(_Section):
    # A subdirectory of the job's own directory (relative, never leaving it); None: "checkpoints".
    directory: PathText | None = None
    interval: int = Field(0, ge=0, le=MAX_STEPS)
    keep_last: int = Field(2, ge=1, le=MAX_STEPS)
    keep_every: int = Field(0, ge=0, le=MAX_STEPS)
    async_save: bool = True


class JobSpec(_Section):
    name: str = Field(max_length=MAX_NAME)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    model: ModelSpec = Field(default_factory=ModelSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV_ENTRIES)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError("must be an RFC 1123 label: lower-case letters, digits and '-', "
                             "starting and ending with a letter or digit, at most 63 characters")
        return value

    @property
    def world_size(self) -> int:
        return self.parallelism.world_size


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Validates a spec given as plain data (YAML or a proto turned to a dict) and fills its defaults."""
    if not isinstance(data, dict):
        raise SpecError([FieldViolation("", "a job spec must be a mapping")])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_violation_from_pydantic(err) for err in exc.errors()]) from None
    violations = _cross_field_violations(spec)
    if violations:
        raise SpecError(violations)
    if spec.resources.ranks is None:
        spec.resources.ranks = spec.world_size
    if spec.resources.min_ranks is None:
        spec.resources.min_ranks = spec.resources.ranks
    return spec


def spec_from_json(text: str | bytes) -> JobSpec:
    """A spec the control plane wrote (`JobSpec.model_dump_json`, as a rank gets it), read straight into the
    model and held to the same rules as `parse_spec`."""
    try:
        spec = JobSpec.model_validate_json(text)
    except ValidationError as exc:
        raise SpecError([_violation_from_pydantic(err) for err in exc.errors()]) from None
    violations = _cross_field_violations(spec)
    if violations:
        raise SpecError(violations)
    return spec


def load_spec_file(path: str) -> JobSpec:
    """The spec in a YAML file (contract.yaml_file: UTF-8, no duplicate keys), validated."""
    data = load_yaml_file(path)
    return parse_spec({} if data is None else data)


def spec_from_proto(message: job_pb2.JobSpec) -> JobSpec:
    if _has_unknown_fields(message):
        raise SpecError([FieldViolation(p, "unknown field") for p in _unknown_field_paths(message, "")])
    return parse_spec(_message_to_dict(message))


def spec_to_proto(spec: JobSpec) -> job_pb2.JobSpec:
    return dict_to_message(spec.model_dump(mode="json", exclude_none=True), job_pb2.JobSpec())


def dict_to_message(data: dict[str, Any], message):
    """Fills a message from plain data whose keys are its field names (the spec's YAML shape).

    Written out rather than json_format: this runs on every CreateJob and GetJob, and is ten times faster."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        field = fields[key]
        kind = _kind(field)
        if kind is _MESSAGE_MAP:
            for map_key, item in value.items():
                dict_to_message(item, getattr(message, key)[map_key])
        elif kind is _SCALAR_MAP:
            getattr(message, key).update(value)
        elif kind is _MESSAGES:
            for item in value:
                dict_to_message(item, getattr(message, key).add())
        elif kind is _MESSAGE:
            dict_to_message(value, getattr(message, key))
        else:
            setattr(message, key, value)
    return message


def _message_to_dict(message) -> dict[str, Any]:
    """The fields a client set, by name; unset optional scalars are left out so defaults apply."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        kind = _kind(field)
        if kind is _MESSAGE_MAP:
            out[field.name] = {map_key: _message_to_dict(item) for map_key, item in value.items()}
        elif kind is _SCALAR_MAP:
            out[field.name] = dict(value)
        elif kind is _MESSAGES:
            out[field.name] = [_message_to_dict(item) for item in value]
        elif kind is _MESSAGE:
            out[field.name] = _message_to_dict(value)
        else:
            out[field.name] = value
    return out


def _violation_from_pydantic(err: dict[str, Any]) -> FieldViolation:
    path = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return FieldViolation(path, "unknown field")
    if err["type"] == "missing":
        return FieldViolation(path, "required")
    message = err["msg"].removeprefix("Value error, ")
    return FieldViolation(path, message)


def _cross_field_violations(spec: JobSpec) -> list[FieldViolation]:
    """The rules that relate fields to each other, each reported at the field a user would change."""
    out: list[FieldViolation] = []
    m, p, t = spec.model, spec.parallelism, spec.training
    if m.hidden_size % m.heads:
        out.append(FieldViolation("model.hidden_size", f"{m.hidden_size} is not divisible by model.heads={m.heads}"))
    if m.positions == "rotary" and m.hidden_size % m.heads == 0 and (m.hidden_size // m.heads) % 2:
        out.append(FieldViolation("model.positions", f"rotary positions need an even head size; "
                                                     f"hidden_size/heads = {m.hidden_size // m.heads}"))
    if m.mup is not None:
        out += _mup_violations(m)
    out += layout_violations(p.layout, m, t)
    if spec.resources.ranks is not None and spec.resources.ranks != p.world_size:
        out.append(FieldViolation(
            "resources.ranks",
            f"{spec.resources.ranks} ranks, but tp*pp*dp = {p.tp}*{p.pp}*{p.dp} = {p.world_size}"))
    if spec.resources.min_ranks is not None and spec.resources.min_ranks > p.world_size:
        out.append(FieldViolation("resources.min_ranks",
                                  f"{spec.resources.min_ranks} exceeds the job's {p.world_size} ranks (tp*pp*dp)"))
    out += _offload_violations(t.offload)
    if spec.resources.accelerator_memory is not None:
        out += _accelerator_memory_violations(spec)
    if t.warmup_steps > t.steps:
        out.append(FieldViolation("training.warmup_steps", f"{t.warmup_steps} exceeds training.steps={t.steps}"))
    for key, value in spec.labels.items():
        problem = label_problem(key, value)
        if problem:
            out.append(FieldViolation(f"labels.{key}", problem))
    for key, value in spec.kubernetes.node_selector.items():
        problem = label_problem(key, value)
        if problem:
            out.append(FieldViolation(f"kubernetes.node_selector.{key}", problem))
    for index, toleration in enumerate(spec.kubernetes.tolerations):
        problem = label_problem(toleration.key or "x", toleration.value or "")
        if problem:
            out.append(FieldViolation(f"kubernetes.tolerations.{index}", problem))
    if spec.checkpoint.directory is not None:
        problem = checkpoint_directory_problem(spec.checkpoint.directory)
        if problem:
            out.append(FieldViolation("checkpoint.directory", problem))
    for key, value in spec.env.items():
        problem = env_name_problem(key) or env_value_problem(value)
        if problem:
            out.append(FieldViolation(f"env.{key}", problem))
    for key in spec.kubernetes.env_from_secrets:
        problem = env_name_problem(key) or (
            "a test hook is set in `env`, not from a Secret" if is_test_hook(key) else None) or (
            "also set in `env`: a variable comes from one place" if key in spec.env else None)
        if problem:
            out.append(FieldViolation(f"kubernetes.env_from_secrets.{key}", problem))
    env_size = sum(len(k) + len(v) for k, v in spec.env.items())
    if env_size > MAX_ENV_TOTAL:
        out.append(FieldViolation("env", f"{env_size} characters of names and values; at most {MAX_ENV_TOTAL}"))
    if approximate_parameters(m) > MAX_PARAMETERS:
        out.append(FieldViolation("model", f"about {approximate_parameters(m):.3g} parameters; at most "
                                           f"{MAX_PARAMETERS:.0g}"))
    return out


def _accelerator_memory_violations(spec: JobSpec) -> list[FieldViolation]:
    """The job's own layout must fit its declared accelerator memory at least with the optimizer state offloaded
    (the planner then offloads it if it must; contract.sizing)."""
    memory = spec.resources.accelerator_memory
    if offload_mode_at(spec, spec.parallelism.layout) is None:
        fit = fit_at(spec.model, spec.training, spec.parallelism.layout, memory)
        return [FieldViolation("resources.accelerator_memory", (
            f"{memory} per rank cannot hold the model even with its optimizer state offloaded: {fit.describe()}; "
            "split the model over more ranks (parallelism.tp or pp) or use a smaller micro_batch_size"))]
    return []


def env_name_problem(name: str) -> str | None:
    """Why a spec's `env` may not set `name` (None: it may). Test hooks pass here; contract.reach refuses
    them unless the server allows test hooks."""
    if not _ENV_NAME.fullmatch(name):
        return ("not an allowed environment variable name: letters, digits and '_', not starting with a digit, "
                "at most 128 characters")
    upper = name.upper()
    if (upper in REFUSED_ENV or upper.startswith(REFUSED_ENV_PREFIXES) or upper.endswith(REFUSED_ENV_SUFFIXES)):
        return ("reserved: set by the launcher, or read by the loader, interpreter, shell or a proxy before the "
                "trainer runs; a job may not set it")
    return None


def env_value_problem(value: str) -> str | None:
    if value == REDACTED_ENV_VALUE:
        return (f"{REDACTED_ENV_VALUE} is the placeholder shown to those who may not read this job's env values, "
                "not a value: set the real one")
    if "\0" in value:
        return "a value may not contain a NUL character"
    if len(value) > MAX_ENV_VALUE:
        return f"a value may be at most {MAX_ENV_VALUE} characters"
    return None


def is_test_hook(name: str) -> bool:
    return name.upper().startswith(TEST_HOOK_PREFIXES)


def checkpoint_directory_problem(directory: str) -> str | None:
    """Why `directory` cannot be a job's checkpoint directory: it must name a subdirectory of the job's own
    directory. Checked here by its text; symlinks are checked where the directory is created and used
    (contract.job_dirs.resolve_inside)."""
    if "\0" in directory or "\\" in directory:
        return "may not contain a NUL character or a backslash"
    path = PurePosixPath(directory)
    if path.is_absolute():
        return "must be relative: a subdirectory of the job's own directory, not an absolute path"
    if ".." in path.parts:
        return "may not contain '..': it must stay inside the job's own directory"
    if not path.parts:
        return "must name a subdirectory of the job's own directory"
    return None


def _mup_violations(m: ModelSpec) -> list[FieldViolation]:
    """The base shapes must be ones the model could have: a base width split into whole heads."""
    out = []
    if m.mup.base_head_dim is None and m.mup.base_hidden_size % m.heads:
        out.append(FieldViolation("model.mup.base_hidden_size",
                                  f"{m.mup.base_hidden_size} is not divisible by model.heads={m.heads}; "
                                  "set model.mup.base_head_dim"))
    if m.mup.base_head_dim is not None and m.mup.base_hidden_size % m.mup.base_head_dim:
        out.append(FieldViolation("model.mup.base_head_dim", f"{m.mup.base_head_dim} does not divide "
                                                             f"model.mup.base_hidden_size={m.mup.base_hidden_size}"))
    return out


def _offload_violations(o: OffloadSpec) -> list[FieldViolation]:
    where = "training.offload"
    if o.mode != "interleaved":  # placement is the accelerator's share: nothing to place without one
        given = {"placement": o.placement != "auto", "device_fraction": o.device_fraction is not None,
                 "profile": o.profile is not None}
        return [FieldViolation(f"{where}.{field}", f"only for mode interleaved (mode is {o.mode})")
                for field, is_set in given.items() if is_set]
    out = []
    if o.placement == "static" and o.device_fraction is None:
        out.append(FieldViolation(f"{where}.device_fraction", "required for placement static: the share of "
                                                              "the subgroups the accelerator updates, 0 to 1"))
    if o.placement == "auto" and o.device_fraction is not None:
        out.append(FieldViolation(f"{where}.device_fraction", "only for placement static (placement auto lets "
                                                              "the performance model choose)"))
    if o.placement == "static" and o.profile is not None:
        out.append(FieldViolation(f"{where}.profile", "only for placement auto"))
    return out


def offload_mode_at(spec: JobSpec, layout: Layout) -> str | None:
    """The offload mode the spec's ranks run at `layout`: training.offload.mode, except that where the declared
    resources.accelerator_memory holds the model only with its optimizer state offloaded, `none` becomes
    `interleaved`. None: the declared memory holds the model at `layout` neither way."""
    memory = spec.resources.accelerator_memory
    if memory is None:
        return spec.training.offload.mode
    return offload_mode_for(spec.training.offload.mode, fit_at(spec.model, spec.training, layout, memory))


def offload_host_bytes(spec: JobSpec) -> int:
    """About how much host memory a rank pins with offload on: its 1/dp share of the optimizer state of its
    1/(tp*pp) of the model, plus the checkpointer's snapshot buffers of it."""
    return pinned_host_bytes(approximate_parameters(spec.model), spec.parallelism.layout,
                             weight_bytes_of(spec.training.precision), snapshot=True)


def spec_warnings(spec: JobSpec) -> list[FieldViolation]:
    """What a valid spec may get wrong without being refused: each a field and why it may fail at run time."""
    out = []
    memory = spec.resources.memory
    if memory is not None and offload_mode_at(spec, spec.parallelism.layout) != "none":
        needed, limit = offload_host_bytes(spec), parse_quantity(memory)
        if needed > limit:
            out.append(FieldViolation("resources.memory", (
                f"{memory} per rank may not hold the offloaded optimizer state: about {needed / 2**30:.1f} GiB "
                f"pinned per rank ({OFFLOAD_STATE_BYTES}+weight bytes per parameter / dp, plus the checkpoint "
                "snapshot buffers), before the model, data and Python")))
    return out


def label_problem(key: str, value: str) -> str | None:
    """Why `key: value` cannot be a Kubernetes label (None: it can); also for filters on labels."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _LABEL_PREFIX.fullmatch(prefix)):
        return "label key prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return "label key must be at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return "label value must be at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _has_unknown_fields(message: Any) -> bool:
    """Whether anything in `message` is a field this server does not know (one copy in protobuf's own code,
    rather than a walk in Python on every call)."""
    known = type(message)()
    known.CopyFrom(message)
    known.DiscardUnknownFields()
    return known.ByteSize() != message.ByteSize()


def _unknown_field_paths(message: Any, prefix: str) -> list[str]:
    """Fields a newer client sent that this server does not know: rejected rather than silently dropped."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    paths = [f"{prefix}#{field.field_number}" for field in UnknownFieldSet(message)]
    for descriptor, value in message.ListFields():
        kind = _kind(descriptor)
        if kind is _MESSAGE_MAP:
            for map_key, item in value.items():
                paths += _unknown_field_paths(item, f"{prefix}{descriptor.name}.{map_key}.")
        elif kind is _MESSAGE or kind is _MESSAGES:
            items = enumerate(value) if kind is _MESSAGES else [(None, value)]
            for index, item in items:
                where = descriptor.name if index is None else f"{descriptor.name}.{index}"
                paths += _unknown_field_paths(item, f"{prefix}{where}.")
    return paths


# What a message's field holds, as the walks above treat it: a scalar (a repeated one too), a message, repeated
# messages, a map of scalars, or a map of messages (kubernetes.env_from_secrets). Cached per field: the walks
# run on every CreateJob and GetJob, and reading a descriptor's options is not free.
_SCALAR, _MESSAGE, _MESSAGES, _SCALAR_MAP, _MESSAGE_MAP = "scalar", "message", "messages", "scalar map", "message map"


@functools.cache
def _kind(field) -> str:
    message = field.message_type
    if message is None:
        return _SCALAR
    if message.GetOptions().map_entry:
        return _MESSAGE_MAP if message.fields_by_name["value"].message_type is not None else _SCALAR_MAP
    return _MESSAGES if field.is_repeated else _MESSAGE
