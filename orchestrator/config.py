"""Where the control plane and its CLI find things: one home directory, overridable by environment; and the
modes of what the control plane keeps there (readable by its own user alone)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8080
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_GRPC_PORT}"
# How long a dashboard login lasts (`roundhouse serve --session-ttl`).
DEFAULT_SESSION_TTL_SECONDS = 12 * 3600
TOKEN_FILE_NAME = "admin-token"
# The home directory, the database, the admin token and the runs' files hold secrets (the rank credential key,
# tokens, specs with env values): other users of the machine may not read them.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def home_dir() -> Path:
    """$ROUNDHOUSE_HOME, else ~/.roundhouse: the database, the admin token and the runs' logs live here."""
    return Path(os.environ.get("ROUNDHOUSE_HOME") or Path.home() / ".roundhouse")


def default_db_url(home: Path) -> str:
    return f"sqlite:///{home / 'roundhouse.db'}"


def token_file(home: Path) -> Path:
    return home / TOKEN_FILE_NAME


def server_address(explicit: str | None = None) -> str:
    return explicit or os.environ.get("ROUNDHOUSE_SERVER") or DEFAULT_SERVER


def user_token(explicit: str | None = None, home: Path | None = None) -> str | None:
    """--token, else $ROUNDHOUSE_TOKEN, else the admin token the embedded server wrote at first start."""
    if explicit:
        return explicit
    if os.environ.get("ROUNDHOUSE_TOKEN"):
        return os.environ["ROUNDHOUSE_TOKEN"]
    path = token_file(home or home_dir())
    return path.read_text().strip() if path.exists() else None


def client_tls(explicit_ca: str | None = None) -> tuple[str | None, str | None, str | None] | None:
    """(CA, client certificate, client key) files for TLS: --tls-ca, else $ROUNDHOUSE_TLS_CA, and
    $ROUNDHOUSE_TLS_CLIENT_CERT / $ROUNDHOUSE_TLS_CLIENT_KEY; None when none of them is set."""
    files = (explicit_ca or os.environ.get("ROUNDHOUSE_TLS_CA") or None,
             os.environ.get("ROUNDHOUSE_TLS_CLIENT_CERT") or None, os.environ.get("ROUNDHOUSE_TLS_CLIENT_KEY") or None)
    return files if any(files) else None


# -- file modes --------------------------------------------------------------------------------------------


def private_dir(path: Path, warn: bool = False) -> Path:
    """Creates the directory `path` (and missing parents) for this user alone (0700), or tightens an existing
    one that others may enter (with a warning if `warn`)."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    tighten(path, PRIVATE_DIR_MODE, warn)
    return path


def tighten(path: Path, mode: int, warn: bool = False) -> None:
    """Takes from the existing `path` every permission bit outside `mode` (a file: PRIVATE_FILE_MODE; a
    directory: PRIVATE_DIR_MODE). One this user cannot change (not its own) is left with a warning."""
    current = stat.S_IMODE(path.stat().st_mode)
    if not current & ~mode:
        return
    try:
        os.chmod(path, current & mode)
    except OSError as exc:
        log.warning("%s has mode %o, readable by other users, and could not be tightened to %o: %s",
                    path, current, mode, exc)
        return
    if warn:
        log.warning("%s had mode %o, readable by other users; tightened to %o", path, current, current & mode)


def private_opener(path: str, flags: int) -> int:
    """For open(..., opener=private_opener): a file created, or an existing one truncated or appended to, that
    only this user may read (0600)."""
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & PRIVATE_FILE_MODE)
    return fd
