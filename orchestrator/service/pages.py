"""Page tokens: opaque to callers, bound to what they page through, so a token from one listing is refused
by another (a different filter, page size or job).

A token comes back from the caller, so it is untrusted input: anything but what `_encode` wrote for this
listing (too long, not base64 or JSON, a time with a zone or out of range, a name no resource can have, a
step out of range) decodes to None, and the listing refuses it as INVALID_ARGUMENT; nothing of it reaches a
query unchecked."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime

# What _encode writes is well under this.
MAX_TOKEN_LENGTH = 512
# Names of jobs and sweeps (an RFC 1123 label), the only names a token carries.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_STEP = 2**63 - 1


def job_filter_key(states: list[str], labels: dict[str, str], page_size: int) -> str:
    """What a job listing's page token is bound to."""
    text = json.dumps([sorted(states), sorted(labels.items()), page_size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_job_token(created: datetime, name: str, filter_key: str) -> str:
    return _encode({"t": created.isoformat(), "n": name, "f": filter_key})


def decode_job_token(token: str, filter_key: str) -> tuple[datetime, str] | None:
    """The (create time, name) the next page of jobs starts after, if the token is for this filter."""
    data = _decode(token)
    if data.get("f") != filter_key or not _is_name(data.get("n")) or not isinstance(data.get("t"), str):
        return None
    try:
        created = datetime.fromisoformat(data["t"])
    except ValueError:
        return None
    if created.tzinfo is not None:  # the store's times are naive UTC; _encode never writes a zone
        return None
    return created, data["n"]


def encode_checkpoint_token(step: int, job: str, page_size: int) -> str:
    return _encode({"s": step, "j": job, "p": page_size})


def decode_checkpoint_token(token: str, job: str, page_size: int) -> int | None:
    """The step the next page starts below, if the token is for this job and page size."""
    data = _decode(token)
    step = data.get("s")
    if (data.get("j"), data.get("p")) != (job, page_size) or type(step) is not int or not 0 <= step <= _MAX_STEP:
        return None
    return step


def _is_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 63 and _NAME.fullmatch(value) is not None


def _encode(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _decode(token: str) -> dict:
    """What _encode wrote, or {} for anything else."""
    if len(token) > MAX_TOKEN_LENGTH:
        return {}
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, binascii.Error, RecursionError):  # UnicodeError is a ValueError
        return {}
    return data if isinstance(data, dict) else {}
