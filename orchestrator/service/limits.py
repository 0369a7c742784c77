"""The operator's limits on what a spec may ask for, and per-user quotas: one place that decides, at CreateJob
and CreateSweep, before anything is written.

Set with `roundhouse serve --limits FILE` (YAML, the fields of `Limits` below) and the flags that override
single numbers (`--max-ranks-per-job`, ...). A field left unset is no limit; an allow-list left unset allows
anything, an empty one only the server's own default (e.g. `images: []`: only `--image`).

- A spec over a limit that it could never meet (ranks per job, model size, GPUs per rank, an image or volume
  claim not allowed, ...) is INVALID_ARGUMENT, naming the field and the limit.
- A spec that would take its owner over a quota (active jobs, active ranks; active: not yet ended) is
  RESOURCE_EXHAUSTED, naming the field and the quota: it may be accepted once the owner's jobs have ended.
  The count and the write happen under one lock per owner (`Quotas.admit`), so concurrent calls of one user
  cannot both pass the last free place. A sweep's trials and target are the sweep owner's jobs: they count
  against the quota like any other, but the sweep controller does not wait for it: a sweep is checked when
  it is created, for its `max_parallel` trials at once.

`default_resources` fills a spec's per-rank cpu and memory where it has none (Kubernetes only reads them),
so no pod runs without requests and limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from contract.errors import FieldViolation, SpecError
from contract.spec import DnsSubdomain, JobSpec, Quantity, approximate_parameters, label_problem
from contract.yaml_file import load_yaml_file
from orchestrator.service.errors import ResourceExhausted
from orchestrator.store import Database, Job, JobState

_ACTIVE_STATES = sorted(s.value for s in JobState if not s.terminal)
Positive = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DefaultResources(_Strict):
    """Per rank, for specs that set none (Kubernetes: requests equal limits)."""

    cpu: Quantity | None = None
    memory: Quantity | None = None


class KubernetesLimits(_Strict):
    """Allow-lists of what a spec's `kubernetes` section may name (unset: anything)."""

    # An entry ending in "*" allows every image that starts with what precedes it ("registry.example.com/ml/*").
    images: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = None
    volume_claims: list[DnsSubdomain] | None = None
    # Toleration keys a spec may tolerate (a toleration without a key tolerates every taint: refused if set).
    tolerations: list[Annotated[str, Field(min_length=1, max_length=317)]] | None = None
    # Node selector keys ("pool": any value) or key=value pairs ("pool=gpu": that value only).
    node_selectors: list[Annotated[str, Field(min_length=1, max_length=381)]] | None = None
    priority_classes: list[DnsSubdomain] | None = None
    # Secrets of the namespace a spec's kubernetes.env_from_secrets may read (unset: any; set it, or every user
    # can put any Secret of the namespace, the control plane's own included, into a rank's environment).
    secrets: list[DnsSubdomain] | None = None


class Limits(_Strict):
    """What this server accepts (unset: no limit)."""

    ranks_per_job: Positive | None = None  # tp*pp*dp
    active_jobs_per_user: Positive | None = None
    active_ranks_per_user: Positive | None = None  # the ranks of a user's unfinished jobs, together
    parameters: Positive | None = None  # the model's size (contract.spec.approximate_parameters)
    gpus_per_rank: Annotated[int, Field(ge=0)] | None = None
    default_resources: DefaultResources = DefaultResources()
    kubernetes: KubernetesLimits = KubernetesLimits()

    @property
    def has_quotas(self) -> bool:
        return self.active_jobs_per_user is not None or self.active_ranks_per_user is not None

    def violations(self, spec: JobSpec) -> list[FieldViolation]:
        """Why `spec` can never run on this server (paths relative to the spec; empty: it can)."""
        out: list[FieldViolation] = []
        ranks = spec.world_size
        per_job = ((self.ranks_per_job, "ranks_per_job"), (self.active_ranks_per_user, "active_ranks_per_user"))
        for limit, name in per_job:  # a job over the quota alone could never start either
            if limit is not None and ranks > limit:
                out.append(FieldViolation("parallelism", f"tp*pp*dp = {ranks} ranks; this server allows at most "
                                                         f"{limit} (limit {name})"))
                break
        if self.parameters is not None and approximate_parameters(spec.model) > self.parameters:
            out.append(FieldViolation("model", f"about {approximate_parameters(spec.model):,} parameters; this "
                                               f"server allows at most {self.parameters:,} (limit parameters)"))
        if self.gpus_per_rank is not None and spec.resources.gpus > self.gpus_per_rank:
            out.append(FieldViolation("resources.gpus", f"{spec.resources.gpus} GPUs per rank; this server allows "
                                                        f"at most {self.gpus_per_rank} (limit gpus_per_rank)"))
        return out + self._kubernetes_violations(spec)

    def with_defaults(self, spec: JobSpec) -> JobSpec:
        """`spec` with the default per-rank cpu and memory where it sets none (a copy; unchanged if none apply)."""
        resources = spec.resources
        filled = {key: value for key, value in (("cpu", self.default_resources.cpu),
                                                ("memory", self.default_resources.memory))
                  if value is not None and getattr(resources, key) is None}
        if not filled:
            return spec
        return spec.model_copy(update={"resources": resources.model_copy(update=filled)})

    def _kubernetes_violations(self, spec: JobSpec) -> list[FieldViolation]:
        k, allowed = spec.kubernetes, self.kubernetes
        out = []
        if k.image is not None and allowed.images is not None and not any(
                k.image.startswith(entry[:-1]) if entry.endswith("*") else k.image == entry
                for entry in allowed.images):
            out.append(FieldViolation("kubernetes.image", _not_allowed("image", allowed.images)))
        if k.volume_claim is not None and allowed.volume_claims is not None \
                and k.volume_claim not in allowed.volume_claims:
            out.append(FieldViolation("kubernetes.volume_claim", _not_allowed("volume claim", allowed.volume_claims)))
        if k.priority_class is not None and allowed.priority_classes is not None \
                and k.priority_class not in allowed.priority_classes:
            out.append(FieldViolation("kubernetes.priority_class",
                                      _not_allowed("priority class", allowed.priority_classes)))
        if allowed.tolerations is not None:
            for index, toleration in enumerate(k.tolerations):
                if toleration.key not in allowed.tolerations:
                    out.append(FieldViolation(f"kubernetes.tolerations.{index}.key",
                                              _not_allowed("toleration key", allowed.tolerations)))
        if allowed.secrets is not None:
            for env_name, ref in k.env_from_secrets.items():
                if ref.name not in allowed.secrets:
                    out.append(FieldViolation(f"kubernetes.env_from_secrets.{env_name}.name",
                                              _not_allowed("Secret", allowed.secrets)))
        if allowed.node_selectors is not None:
            for key, value in k.node_selector.items():
                if key not in allowed.node_selectors and f"{key}={value}" not in allowed.node_selectors:
                    out.append(FieldViolation(f"kubernetes.node_selector.{key}",
                                              _not_allowed("node selector", allowed.node_selectors)))
        return out


def _not_allowed(what: str, allowed: list[str]) -> str:
    shown = ", ".join(allowed[:10]) + (f" and {len(allowed) - 10} more" if len(allowed) > 10 else "")
    return f"this server does not allow this {what} (allowed: {shown or 'none: only the server default'})"


def load_limits(path: str) -> Limits:
    """The limits in a YAML file; raises SpecError naming each bad field, OSError if it cannot be read."""
    data = load_yaml_file(path)
    return parse_limits({} if data is None else data)


def parse_limits(data: object) -> Limits:
    if not isinstance(data, dict):
        raise SpecError([FieldViolation("", "limits must be a mapping")])
    try:
        limits = Limits.model_validate(data)
    except ValidationError as exc:
        raise SpecError([FieldViolation(".".join(str(p) for p in err["loc"]), err["msg"])
                         for err in exc.errors()]) from None
    bad = []
    for index, entry in enumerate(limits.kubernetes.node_selectors or ()):
        key, _, value = entry.partition("=")
        problem = label_problem(key, value)
        if problem:
            bad.append(FieldViolation(f"kubernetes.node_selectors.{index}", problem))
    if bad:
        raise SpecError(bad)
    return limits


class Quotas:
    """Per-user quotas on active jobs and ranks, checked and taken under one lock per owner."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @contextmanager
    def admit(self, db: Database, owner: str, jobs: int, ranks: int, field: str = "spec") -> Iterator[None]:
        """Raises ResourceExhausted if `owner` with `jobs` more active jobs of `ranks` more ranks in all would
        exceed a quota; otherwise runs the block (which writes them) before another call of the same owner
        counts. `field` is the request field the refusal names."""
        if not self.limits.has_quotas:
            yield
            return
        with self._lock_of(owner):
            active_jobs, active_ranks = usage(db, owner)
            most_jobs, most_ranks = self.limits.active_jobs_per_user, self.limits.active_ranks_per_user
            if most_jobs is not None and active_jobs + jobs > most_jobs:
                raise ResourceExhausted(field, f"{owner or 'this user'} has {active_jobs} active job(s); this "
                                               f"server allows {most_jobs} per user (quota active_jobs_per_user)")
            if most_ranks is not None and active_ranks + ranks > most_ranks:
                raise ResourceExhausted(f"{field}.parallelism",
                                        f"{ranks} more rank(s) with the {active_ranks} of {owner or 'this user'}'s "
                                        f"active jobs exceed {most_ranks} per user (quota active_ranks_per_user)")
            yield

    def _lock_of(self, owner: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(owner, threading.Lock())


def usage(db: Database, owner: str) -> tuple[int, int]:
    """How many jobs of `owner` have not ended, and their ranks together (each job's spec's resources.ranks)."""
    ranks = Job.spec[("resources", "ranks")].as_integer()
    with db.read() as session:
        count, total = session.execute(
            select(func.count(), func.coalesce(func.sum(ranks), 0))
            .where(Job.owner == owner, Job.state.in_(_ACTIVE_STATES))).one()
    return int(count), int(total)
