"""Page tokens: opaque to callers, bound to what they page through, so a token from one listing is refused
by another (a different filter, page size or job)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime


def job_filter_key(states: list[str], labels: dict[str, str], page_size: int) -> str:
    """What a job listing's page token is bound to."""
    text = json.dumps([sorted(states), sorted(labels.items()), page_size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_job_token(created: datetime, name: str, filter_key: str) -> str:
    return _encode({"t": created.isoformat(), "n": name, "f": filter_key})


def decode_job_token(token: str, filter_key: str) -> tuple[datetime, str] | None:
    """The (create time, name) the next page of jobs starts after, if the token is for this filter."""
    data = _decode(token)
    try:
        return (datetime.fromisoformat(data["t"]), str(data["n"])) if data["f"] == filter_key else None
    except (ValueError, KeyError, TypeError):
        return None


def encode_checkpoint_token(step: int, job: str, page_size: int) -> str:
    return _encode({"s": step, "j": job, "p": page_size})


def decode_checkpoint_token(token: str, job: str, page_size: int) -> int | None:
    """The step the next page starts below, if the token is for this job and page size."""
    data = _decode(token)
    try:
        return int(data["s"]) if (data["j"], data["p"]) == (job, page_size) else None
    except (ValueError, KeyError, TypeError):
        return None


def _encode(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _decode(token: str) -> dict:
    """What _encode wrote, or {} for anything else."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
