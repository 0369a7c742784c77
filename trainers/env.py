"""What a rank reads from its environment beyond the contract: its spec, its test hooks, and the paths it
may open.

The variables themselves (names, meaning, parsing) are defined once in contract.rank_env, which the launchers
also use; `RankEnv` is re-exported here for the rank's modules.

Test hooks (set through the spec's `env`, so tests can make a rank misbehave on purpose), honoured only when
the launcher sets ROUNDHOUSE_TEST_HOOKS=1 (a server started for tests; others refuse such a spec):

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

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from contract import job_dirs
from contract.rank_env import RankEnv, RankEnvError
from contract.reach import DataPathError, resolve_data_path
from contract.spec import JobSpec, SpecError, is_test_hook, spec_from_json
from trainers.say import say

__all__ = ["ConfigError", "RankEnv", "TestHooks", "checkpoint_root", "data_path", "load_spec", "read_rank_env"]


class ConfigError(Exception):
    """The rank cannot run as configured (bad environment, spec or layout); exits with code 2."""


def read_rank_env(environ: Mapping[str, str] = os.environ) -> RankEnv:
    try:
        return RankEnv.from_environ(environ)
    except RankEnvError as exc:
        raise ConfigError(str(exc)) from None


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
    def from_environ(cls, environ: Mapping[str, str] = os.environ, enabled: bool = False) -> TestHooks:
        """The hooks set in `environ`; none at all unless `enabled` (the launcher's ROUNDHOUSE_TEST_HOOKS)."""
        if not enabled:
            ignored = sorted(name for name in environ if is_test_hook(name))
            if ignored:
                say(f"roundhouse trainer: test hooks off (ROUNDHOUSE_TEST_HOOKS is not 1): ignoring "
                      f"{', '.join(ignored)}", file=sys.stderr)
            return cls()

        def optional(name: str) -> int | None:
            value = environ.get(name)
            return int(value) if value else None

        sleep = environ.get("RH_TEST_STEP_SLEEP")
        delay = environ.get("RH_TEST_SNAPSHOT_DELAY")
        try:
            return cls(fault_exit_at_step=optional("RH_FAULT_EXIT_AT_STEP"),
                       fault_exit_in_save_at_step=optional("RH_FAULT_EXIT_IN_SAVE_AT_STEP"),
                       fault_hang_at_step=optional("RH_FAULT_HANG_AT_STEP"),
                       fault_rank=int(environ.get("RH_FAULT_RANK") or 0),
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
    """The spec the launcher wrote (a file at `path`, else the JSON `inline`), read by the contract's gate."""
    try:
        if path:
            text = Path(path).read_bytes()
        else:
            path = "ROUNDHOUSE_SPEC_JSON"
            text = (inline or "").encode()
    except OSError as exc:
        raise ConfigError(f"cannot read the spec file {path}: {exc}") from None
    try:
        return spec_from_json(text)
    except SpecError as exc:
        raise ConfigError(f"invalid spec in {path}: {exc}") from None


def data_path(spec: JobSpec, env: RankEnv) -> str | None:
    """The data the rank opens: spec.data.path, resolved (symlinks too) inside the launcher's data roots;
    None: the built-in corpus. A rank started by hand (no ROUNDHOUSE_DATA_ROOTS) opens the path as given."""
    if spec.data.path is None or env.data_roots is None:
        return spec.data.path
    try:
        return resolve_data_path(spec.data.path, env.data_roots, follow_symlinks=True)
    except DataPathError as exc:
        raise ConfigError(f"data.path: {exc}") from None


def checkpoint_root(spec: JobSpec, env: RankEnv) -> Path | None:
    """The job's checkpoint directory (None: no checkpoints): the launcher's, checked to resolve inside the
    job's directory when the launcher gave one, so that a symlink cannot lead the rank's reads and deletions
    elsewhere. A rank started by hand without one uses the spec's checkpoint.directory under its working
    directory (contract.job_dirs)."""
    if not env.checkpoint_dir:
        if not spec.checkpoint.directory:
            return None
        return job_dirs.checkpoint_dir(Path.cwd(), spec.checkpoint)
    if not env.job_dir:
        return Path(env.checkpoint_dir)
    try:
        return job_dirs.make_inside(Path(env.job_dir), Path(env.checkpoint_dir))
    except job_dirs.OutsideJobDir as exc:
        raise ConfigError(f"checkpoint.directory: {exc}") from None
