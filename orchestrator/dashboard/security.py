"""The dashboard's browser-facing defences: login sessions, the origin check of state-changing requests, and
the security headers of every response.

Sessions: logging in with an API token creates a random session id, kept in this process's memory and bound
to the token's user; the cookie carries only that id, never the token. A session ends at logout, at its
expiry (`roundhouse serve --session-ttl`), when the server restarts, or within UserTokens.CACHE_SECONDS of its
token being revoked. Sessions are per process: behind several replicas, route a browser to one of them
(sticky sessions) or it will be asked to log in again."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import select
from starlette.datastructures import MutableHeaders
from starlette.requests import Request

from orchestrator.auth import Principal, UserTokens, digest
from orchestrator.config import DEFAULT_SESSION_TTL_SECONDS
from orchestrator.store import ApiToken, Database

SESSION_COOKIE = "roundhouse_session"
# A bound on the sessions kept: past it, the oldest are forgotten (each needs a valid token to create).
MAX_SESSIONS = 10_000
DEFAULT_PORTS = {"http": 80, "https": 443}

# Scripts only from the dashboard's own files (no inline script). Inline styles are allowed: Plotly sets
# style attributes and adds its own <style> rules.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
STRICT_TRANSPORT_SECURITY = "max-age=31536000"


# -- sessions ----------------------------------------------------------------------------------------------

@dataclass
class _Session:
    principal: Principal
    token_digest: str
    expires_at: float  # time.monotonic()
    checked_at: float  # when the token was last seen in the database


class Sessions:
    """Login sessions of this process, by random id. Thread-safe: the dashboard's handlers run on a pool."""

    def __init__(self, db: Database, ttl_seconds: float = DEFAULT_SESSION_TTL_SECONDS,
                 clock=time.monotonic):
        if ttl_seconds <= 0:
            raise ValueError(f"session TTL: must be positive, got {ttl_seconds}")
        self.ttl_seconds = ttl_seconds
        self.clock = clock  # monotonic seconds; tests replace it to expire sessions
        self._db = db
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def create(self, principal: Principal, token: str) -> str:
        """A new session for the user of a token already checked; returns its id."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            for expired in [key for key, s in self._sessions.items() if s.expires_at <= now]:
                del self._sessions[expired]
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]  # the oldest (dicts keep insertion order)
            self._sessions[session_id] = _Session(principal, digest(token), now + self.ttl_seconds, now)
        return session_id

    def principal(self, session_id: str | None) -> Principal | None:
        """Who the session belongs to; None when it is unknown, expired, or its token was revoked. May read
        the database (to see that the token still exists), so not for an event loop."""
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if session.expires_at <= now:
                del self._sessions[session_id]
                return None
            if now - session.checked_at < UserTokens.CACHE_SECONDS:
                return session.principal
        # The token may have been revoked (or its role changed) since: ask the database, outside the lock.
        with self._db.read() as db_session:
            row = db_session.scalar(select(ApiToken).where(ApiToken.token_hash == session.token_digest))
            principal = Principal(row.user, row.role) if row is not None else None
        with self._lock:
            if principal is None:
                self._sessions.pop(session_id, None)
            elif session_id in self._sessions:
                session.principal, session.checked_at = principal, now
        return principal

    def end(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


# -- origins -----------------------------------------------------------------------------------------------

def origin_of(url: str) -> str | None:
    """scheme://host[:port] of a URL as browsers write an Origin header (lower case, default port left out);
    None if it is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS[scheme] else "")


def public_origin(public_url: str) -> str:
    """The origin of `roundhouse serve --public-url`, checked: http(s), a host, served at the root."""
    origin = origin_of(public_url)
    parts = urlsplit(public_url.strip())
    if origin is None:
        raise ValueError(f"--public-url: {public_url!r} is not an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"--public-url: {public_url!r} must be only scheme://host[:port] (the dashboard is served "
                         "at the root of its origin)")
    return origin


def origin_refusal(request: Request, public: str | None) -> str | None:
    """Why a state-changing request does not come from the dashboard's own pages, or None if it does.

    With a public URL (`roundhouse serve --public-url`), the request must carry an Origin header (or, lacking
    one, a Referer) of that URL's origin. Without one, only an Origin header that is present is compared, with
    the request's own scheme and Host header: weaker (a Host is whatever the client says, and a request without
    Origin passes), which is why a team deployment should set --public-url."""
    origin = request.headers.get("origin")
    if public is None:
        if origin is None:
            return None
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return None if origin_of(origin) == origin_of(own) else f"cross-origin request refused: Origin {origin!r}"
    if origin is not None:
        return None if origin_of(origin) == public else \
            f"cross-origin request refused: Origin {origin!r} is not the dashboard's {public}"
    referer = request.headers.get("referer")
    if referer is None:
        return "request refused: it carries neither an Origin nor a Referer header (the dashboard's pages send one)"
    return None if origin_of(referer) == public else \
        f"cross-origin request refused: Referer's origin {origin_of(referer)!r} is not the dashboard's {public}"


def served_securely(request: Request, public: str | None) -> bool:
    """Over TLS here, or behind a proxy whose public URL is https: cookies get the Secure flag."""
    return request.url.scheme == "https" or (public or "").startswith("https://")


# -- headers -----------------------------------------------------------------------------------------------

class SecurityHeaders:
    """ASGI middleware: the security headers on every response; HSTS too when served over TLS."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        over_tls = scope.get("scheme") == "https"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if over_tls:
                    headers["strict-transport-security"] = STRICT_TRANSPORT_SECURITY
            await send(message)

        await self.app(scope, receive, send_with_headers)
