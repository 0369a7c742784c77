"""What a rank learns from its environment: who it is, where its peers and the control plane are, and its spec.

The launcher sets, for every rank:

    RANK, WORLD_SIZE, LOCAL_RANK   the standard torch.distributed identity (defaults 0, 1, RANK)
    MASTER_ADDR, MASTER_PORT       rendezvous of the gloo process group (defaults 127.0.0.1, 29500)
    ROUNDHOUSE_SPEC_FILE           path to a JSON file holding JobSpec.model_dump(mode="json"); or
    ROUNDHOUSE_SPEC_JSON           that JSON itself (pods get it from their attempt's Secret); one is required
    ROUNDHOUSE_SERVER              host:port of the control plane's gRPC; unset or empty: no reporting at all
    ROUNDHOUSE_JOB                 the job's resource name, "jobs/<name>"
    ROUNDHOUSE_ATTEMPT             the attempt number (int, default 0)
    ROUNDHOUSE_JOB_TOKEN           bearer token, sent as gRPC metadata ("authorization", "Bearer <token>")
    ROUNDHOUSE_RUN_DIR             a writable directory for this attempt (may be unset)
    ROUNDHOUSE_START_STEP          the newest committed checkpoint the control plane knows of (informational: the
                                   trainer resumes from the newest checkpoint in the directory that passes its checks)
    ROUNDHOUSE_CHECKPOINT_DIR      the job's checkpoint directory, shared by all ranks and attempts (the spec's
                                   checkpoint.directory when unset; no checkpoints when both are unset)

Test hooks (set through the spec's `env`, so tests can make a rank misbehave on purpose):

    RH_FAULT_EXIT_AT_STEP=N        the rank RH_FAULT_RANK (default 0) exits at once with code 17 when it reaches
                                   step N (steps count from 1), as if it crashed
    RH_FAULT_EXIT_IN_SAVE_AT_STEP=N  the fault rank exits with code 17 in the middle of writing step N's checkpoint
                                   (its shards written, the manifest not yet)
    RH_FAULT_HANG_AT_STEP=N        the fault rank stops its heartbeats and blocks forever at step N (a hang)
    RH_FAULT_RANK=R                which rank the fault hits
    RH_FAULT_ATTEMPT=A             faults fire only in attempt A (default: in every attempt)
    RH_TEST_STEP_SLEEP=seconds     sleep that long after every step, so a test can catch a job mid-run
    RH_TEST_SNAPSHOT_DELAY=seconds every rank waits that long before a checkpoint's snapshot copy, as a slow copy
                                   would (an async save's copy then outlasts the next step's forward and backward)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from contract.spec import JobSpec, parse_spec


class ConfigError(Exception):
    """The rank cannot run as configured (bad environment, spec or layout); exits with code 2."""


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    spec_file: str
    server: str | None
    job: str
    attempt: int
    token: str
    run_dir: str | None
    start_step: int
    checkpoint_dir: str | None = None
    spec_json: str | None = None  # the spec inline, when there is no spec file

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> RankEnv:
        rank = _int(environ, "RANK", 0)
        world_size = _int(environ, "WORLD_SIZE", 1)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"RANK={rank} is not within WORLD_SIZE={world_size}")
        spec_file = environ.get("ROUNDHOUSE_SPEC_FILE", "")
        spec_json = environ.get("ROUNDHOUSE_SPEC_JSON", "")
        if not spec_file and not spec_json:
            raise ConfigError("neither ROUNDHOUSE_SPEC_FILE nor ROUNDHOUSE_SPEC_JSON is set: one must give the "
                              "job's spec (a JSON file, or the JSON itself)")
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=_int(environ, "LOCAL_RANK", rank),
            master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(environ, "MASTER_PORT", 29500),
            spec_file=spec_file,
            server=environ.get("ROUNDHOUSE_SERVER") or None,
            job=environ.get("ROUNDHOUSE_JOB", ""),
            attempt=_int(environ, "ROUNDHOUSE_ATTEMPT", 0),
            token=environ.get("ROUNDHOUSE_JOB_TOKEN", ""),
            run_dir=environ.get("ROUNDHOUSE_RUN_DIR") or None,
            start_step=_int(environ, "ROUNDHOUSE_START_STEP", 0),
            checkpoint_dir=environ.get("ROUNDHOUSE_CHECKPOINT_DIR") or None,
            spec_json=spec_json or None,
        )


@dataclass(frozen=True)
class TestHooks:
    __test__ = False  # not a pytest class

    fault_exit_at_step: int | None = None
    fault_exit_in_save_at_step: int | None = None
    fault_hang_at_step: int | None = None
    fault_rank: int = 0
    fault_attempt: int | None = None
    step_sleep: float = 0.0
    snapshot_delay: float = 0.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> TestHooks:
        def optional(name: str) -> int | None:
            value = environ.get(name)
            return int(value) if value else None

        sleep = environ.get("RH_TEST_STEP_SLEEP")
        delay = environ.get("RH_TEST_SNAPSHOT_DELAY")
        try:
            return cls(fault_exit_at_step=optional("RH_FAULT_EXIT_AT_STEP"),
                       fault_exit_in_save_at_step=optional("RH_FAULT_EXIT_IN_SAVE_AT_STEP"),
                       fault_hang_at_step=optional("RH_FAULT_HANG_AT_STEP"),
                       fault_rank=_int(environ, "RH_FAULT_RANK", 0),
                       fault_attempt=optional("RH_FAULT_ATTEMPT"),
                       step_sleep=float(sleep) if sleep else 0.0,
                       snapshot_delay=float(delay) if delay else 0.0)
        except ValueError as exc:
            raise ConfigError(f"bad test hook setting: {exc}") from None

    def _hits(self, at: int | None, rank: int, attempt: int, step: int) -> bool:
        return at == step and self.fault_rank == rank and self.fault_attempt in (None, attempt)

    def should_crash(self, rank: int, step: int, attempt: int = 0) -> bool:
        return self._hits(self.fault_exit_at_step, rank, attempt, step)

    def should_crash_in_save(self, rank: int, step: int, attempt: int = 0) -> bool:
        return self._hits(self.fault_exit_in_save_at_step, rank, attempt, step)

    def should_hang(self, rank: int, step: int, attempt: int = 0) -> bool:
        return self._hits(self.fault_hang_at_step, rank, attempt, step)


def load_spec(path: str, inline: str | None = None) -> JobSpec:
    """The spec the launcher wrote (a file at `path`, else the JSON `inline`), validated (and defaulted) by the
    control plane's own gate."""
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            path = "ROUNDHOUSE_SPEC_JSON"
            data = json.loads(inline or "")
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the spec file {path}: {exc}") from None
    try:
        return parse_spec(data)
    except ValueError as exc:
        raise ConfigError(f"invalid spec in {path}: {exc}") from None


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
