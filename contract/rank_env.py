"""The rank environment: what a launcher tells each rank through environment variables, defined once.

Both launchers (orchestrator/launcher/local.py, k8s/manifests.py) write it with `RankEnv.to_environ` and the
rank reads it with `RankEnv.from_environ`. A rank's whole environment is this, the spec's `env` (names
checked by contract.spec) and the launcher's documented minimum (local: PATH of the system's directories
then the interpreter's, HOME, LANG, LC_ALL and TMPDIR when the control plane has them, PYTHONUNBUFFERED=1;
Kubernetes: HOME=/tmp, PYTHONUNBUFFERED=1, over the image's own): never the control plane's own variables.

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE   the torch.distributed identity (defaults 0, 1, RANK, WORLD_SIZE)
    MASTER_ADDR, MASTER_PORT       rendezvous of the process group (defaults 127.0.0.1, 29500)
    ROUNDHOUSE_SPEC_FILE           path to a JSON file holding the spec at the attempt's layout; or
    ROUNDHOUSE_SPEC_JSON           that JSON itself (pods get it from their attempt's Secret); one is required
    ROUNDHOUSE_SERVER              host:port of the control plane's gRPC; unset or empty: no reporting at all
    ROUNDHOUSE_SERVER_CA           PEM certificates the rank trusts for that server: set, its channel uses TLS;
                                   unset or empty, plaintext
    ROUNDHOUSE_CLIENT_CERT         PEM certificate (chain) and its key the rank presents to a server that asks
    ROUNDHOUSE_CLIENT_KEY          for one (mutual TLS); both or neither
    ROUNDHOUSE_JOB                 the job's resource name, "jobs/<name>"
    ROUNDHOUSE_ATTEMPT             the attempt number (default 0)
    ROUNDHOUSE_JOB_TOKEN           bearer token for the TrainerService
    ROUNDHOUSE_RUN_DIR             a writable directory for this attempt (may be unset)
    ROUNDHOUSE_START_STEP          the newest committed checkpoint the control plane knows of (informational)
    ROUNDHOUSE_JOB_DIR             the job's directory (contract.job_dirs); the checkpoint directory must
                                   resolve inside it
    ROUNDHOUSE_CHECKPOINT_DIR      the job's checkpoint directory, shared by all ranks and attempts (unset: no
                                   checkpoints)
    ROUNDHOUSE_DATA_ROOTS          where data.path may lead (contract.reach), joined by ":"; set but empty: no
                                   roots, only the built-in corpus; unset (a rank started by hand): not checked
    ROUNDHOUSE_TEST_HOOKS          "1": the rank honours the spec's test hooks (RH_FAULT_*, RH_TEST_*); any
                                   other value, or unset: it ignores them
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
SPEC_FILE = "ROUNDHOUSE_SPEC_FILE"
SPEC_JSON = "ROUNDHOUSE_SPEC_JSON"
SERVER = "ROUNDHOUSE_SERVER"
SERVER_CA = "ROUNDHOUSE_SERVER_CA"
CLIENT_CERT = "ROUNDHOUSE_CLIENT_CERT"
CLIENT_KEY = "ROUNDHOUSE_CLIENT_KEY"
JOB = "ROUNDHOUSE_JOB"
ATTEMPT = "ROUNDHOUSE_ATTEMPT"
JOB_TOKEN = "ROUNDHOUSE_JOB_TOKEN"
RUN_DIR = "ROUNDHOUSE_RUN_DIR"
START_STEP = "ROUNDHOUSE_START_STEP"
JOB_DIR = "ROUNDHOUSE_JOB_DIR"
CHECKPOINT_DIR = "ROUNDHOUSE_CHECKPOINT_DIR"
DATA_ROOTS = "ROUNDHOUSE_DATA_ROOTS"
TEST_HOOKS = "ROUNDHOUSE_TEST_HOOKS"

DATA_ROOTS_SEPARATOR = ":"


class RankEnvError(ValueError):
    """The environment does not describe a rank that can run; the message names the variable."""


@dataclass(frozen=True)
class RankEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    spec_file: str = ""
    spec_json: str | None = None
    server: str | None = None
    server_ca: str | None = None  # PEM text; None: a plaintext channel
    client_cert: str | None = None  # PEM text, with client_key: for a server that wants clients' certificates
    client_key: str | None = None
    job: str = ""
    attempt: int = 0
    token: str = ""
    run_dir: str | None = None
    start_step: int = 0
    job_dir: str | None = None
    checkpoint_dir: str | None = None
    data_roots: tuple[str, ...] | None = None  # None: not checked (no launcher)
    test_hooks: bool = False

    def to_environ(self, leave_out: Collection[str] = ()) -> dict[str, str]:
        """The variables, as strings; None fields are left out, and so are the names in `leave_out` (those a
        launcher sets another way, as a pod's RANK from its completion index)."""
        if any(DATA_ROOTS_SEPARATOR in root for root in self.data_roots or ()):
            raise RankEnvError(f"a data root may not contain {DATA_ROOTS_SEPARATOR!r}: {self.data_roots}")
        values = {
            RANK: self.rank, WORLD_SIZE: self.world_size, LOCAL_RANK: self.local_rank,
            LOCAL_WORLD_SIZE: self.local_world_size, MASTER_ADDR: self.master_addr, MASTER_PORT: self.master_port,
            SPEC_FILE: self.spec_file or None, SPEC_JSON: self.spec_json, SERVER: self.server, SERVER_CA: self.server_ca,
            CLIENT_CERT: self.client_cert, CLIENT_KEY: self.client_key,
            JOB: self.job,
            ATTEMPT: self.attempt, JOB_TOKEN: self.token, RUN_DIR: self.run_dir, START_STEP: self.start_step,
            JOB_DIR: self.job_dir, CHECKPOINT_DIR: self.checkpoint_dir,
            DATA_ROOTS: None if self.data_roots is None else DATA_ROOTS_SEPARATOR.join(self.data_roots),
            TEST_HOOKS: "1" if self.test_hooks else "0",
        }
        return {name: str(value) for name, value in values.items() if value is not None and name not in leave_out}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> RankEnv:
        rank = _int(environ, RANK, 0)
        world_size = _int(environ, WORLD_SIZE, 1)
        if world_size < 1 or not 0 <= rank < world_size:
            raise RankEnvError(f"{RANK}={rank} is not within {WORLD_SIZE}={world_size}")
        spec_file = environ.get(SPEC_FILE, "")
        spec_json = environ.get(SPEC_JSON, "")
        if not spec_file and not spec_json:
            raise RankEnvError(f"neither {SPEC_FILE} nor {SPEC_JSON} is set: one must give the job's spec (a JSON "
                               "file, or the JSON itself)")
        roots = environ.get(DATA_ROOTS)
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=_int(environ, LOCAL_RANK, rank),
            local_world_size=_int(environ, LOCAL_WORLD_SIZE, world_size),
            master_addr=environ.get(MASTER_ADDR) or "127.0.0.1",
            master_port=_int(environ, MASTER_PORT, 29500),
            spec_file=spec_file,
            spec_json=spec_json or None,
            server=environ.get(SERVER) or None,
            server_ca=environ.get(SERVER_CA) or None,
            client_cert=environ.get(CLIENT_CERT) or None,
            client_key=environ.get(CLIENT_KEY) or None,
            job=environ.get(JOB, ""),
            attempt=_int(environ, ATTEMPT, 0),
            token=environ.get(JOB_TOKEN, ""),
            run_dir=environ.get(RUN_DIR) or None,
            start_step=_int(environ, START_STEP, 0),
            job_dir=environ.get(JOB_DIR) or None,
            checkpoint_dir=environ.get(CHECKPOINT_DIR) or None,
            data_roots=None if roots is None else tuple(r for r in roots.split(DATA_ROOTS_SEPARATOR) if r),
            test_hooks=environ.get(TEST_HOOKS) == "1",
        )


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RankEnvError(f"{name}={value!r} is not an integer") from None
