"""Where the control plane and its CLI find things: one home directory, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8080
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_GRPC_PORT}"
# How long a dashboard login lasts (`roundhouse serve --session-ttl`).
DEFAULT_SESSION_TTL_SECONDS = 12 * 3600
TOKEN_FILE_NAME = "admin-token"


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
