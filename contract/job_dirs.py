"""Where a job's files live: one rule for both launchers and the rank.

    <jobs root>/<job>/                     the job's directory (local: <home>/runs; Kubernetes: <volume>/jobs)
    <job dir>/attempt-<n>/                 an attempt's run directory (the local launcher's pids, exit codes, logs)
    <job dir>/<checkpoint.directory>/      the job's checkpoints, shared by all its attempts ("checkpoints"
                                           when the spec names none)

A spec names its checkpoint directory only relative to its job's directory (contract.spec refuses absolute
paths and '..'); a symlink could still lead out, so whoever creates or opens the directory resolves it with
`resolve_inside` first (the local launcher before it creates it, the rank before it reads or deletes a
checkpoint there)."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import TypeVar

from contract.spec import CheckpointSpec, checkpoint_directory_problem

DEFAULT_CHECKPOINT_DIRECTORY = "checkpoints"

P = TypeVar("P", bound=PurePath)


class OutsideJobDir(ValueError):
    """A path that should be inside a job's directory leads out of it (a symlink, usually)."""


def job_dir(jobs_root: P, job: str) -> P:
    return jobs_root / job


def attempt_dir(job_directory: P, attempt: int) -> P:
    return job_directory / f"attempt-{attempt}"


def checkpoint_dir(job_directory: P, checkpoint: CheckpointSpec) -> P:
    """The job's checkpoint directory: the spec's checkpoint.directory under the job's directory."""
    relative = checkpoint.directory or DEFAULT_CHECKPOINT_DIRECTORY
    problem = checkpoint_directory_problem(relative)
    if problem:  # the spec gate refuses these; a spec that never passed it is refused here too
        raise OutsideJobDir(f"checkpoint.directory {relative!r}: {problem}")
    return job_directory / relative


def resolve_inside(job_directory: Path, path: Path) -> Path:
    """`path` with every symlink resolved, provided it stays inside `job_directory` (also resolved); raises
    OutsideJobDir otherwise. Parts that do not exist yet are taken as they are written."""
    real_job = job_directory.resolve()
    real = path.resolve()
    if real != real_job and real_job not in real.parents:
        raise OutsideJobDir(f"{path} resolves to {real}, outside the job's directory {real_job}")
    return real


def make_inside(job_directory: Path, path: Path) -> Path:
    """Creates `path` (and its parents) inside `job_directory`, refusing one that a symlink leads out of, both
    before anything is created and after (in case a link appeared in between). Returns the resolved path."""
    resolve_inside(job_directory, path)
    path.mkdir(parents=True, exist_ok=True)
    return resolve_inside(job_directory, path)
