"""Bearer tokens: who a caller is (authentication). Users' tokens guard the JobService and the dashboard;
each job has its own token for its ranks, which guards the TrainerService. Only SHA-256 digests are stored.
What a caller may do once known is decided in orchestrator/service/access.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from sqlalchemy import func, select

from orchestrator.config import PRIVATE_FILE_MODE, private_dir, private_opener, tighten, token_file
from orchestrator.store import ApiToken, Database, ServerSecret

# Calls any client may make: health checks and reflection (what grpcurl and load balancers use).
PUBLIC_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
TRAINER_SERVICE_PREFIX = "/roundhouse.v1.TrainerService/"
# What each role may do is decided in one place, orchestrator/service/access.py.
ADMIN = "admin"
USER = "user"
ROLES = (ADMIN, USER)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    user: str
    role: str


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip() or None
    return None


def rank_credential_key(db: Database) -> bytes:
    """The key that derives every job's rank credential; made once, kept in the database."""
    with db.session() as session:
        row = session.get(ServerSecret, "rank-credential-key")
        if row is None:
            row = ServerSecret(name="rank-credential-key", value=secrets.token_hex(32))
            session.add(row)
        return bytes.fromhex(row.value)


def job_token(key: bytes, job_uid: str, attempt: int) -> str:
    """The credential the ranks of one attempt present. Derived, not stored: the launcher can hand it out
    again after a control-plane restart, and it is worthless for any other job or attempt."""
    return hmac.new(key, f"{job_uid}/{attempt}".encode(), hashlib.sha256).hexdigest()


def ensure_admin_token(db: Database, home: Path) -> None:
    """First start of the embedded default: create an admin token and leave it where the CLI looks.

    Idempotent: a server restarted on the same database and home keeps the token it had."""
    path = token_file(home)
    with db.session() as session:
        if session.scalar(select(ApiToken.id).limit(1)) is not None:
            if path.exists():  # written by an older version, or its mode changed since: this user's alone
                tighten(path, PRIVATE_FILE_MODE, warn=True)
            return
        token = new_token()
        session.add(ApiToken(user="admin", role=ADMIN, token_hash=digest(token)))
        private_dir(home)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", opener=private_opener) as f:  # 0600, also if a stale .tmp was left looser
            f.write(token + "\n")
        os.replace(tmp, path)


def create_token(db: Database, user: str, role: str) -> str:
    """A new bearer token for `user`; only its digest is stored, so this is the one time it can be shown."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not user or len(user) > 128:
        raise ValueError("a user name of 1 to 128 characters is required")
    token = new_token()
    with db.session() as session:
        session.add(ApiToken(user=user, role=role, token_hash=digest(token)))
    return token


def revoke_tokens(db: Database, user: str) -> int:
    """Deletes every token of `user`; returns how many. Servers forget them within UserTokens.CACHE_SECONDS."""
    with db.session() as session:
        rows = session.scalars(select(ApiToken).where(ApiToken.user == user)).all()
        for row in rows:
            session.delete(row)
        return len(rows)


def list_tokens(db: Database) -> list[tuple[str, str, int]]:
    """(user, role, how many tokens) for every user with a token."""
    with db.read() as session:
        rows = session.execute(select(ApiToken.user, ApiToken.role, func.count())
                               .group_by(ApiToken.user, ApiToken.role).order_by(ApiToken.user, ApiToken.role))
        return [(user, role, count) for user, role, count in rows]


class UserTokens:
    """Looks up which user a token belongs to. Known tokens are remembered for a few seconds, since every
    call checks its token."""

    CACHE_SECONDS = 10.0

    def __init__(self, db: Database):
        self._db = db
        self._cache: dict[str, tuple[float, Principal]] = {}

    def cached(self, token: str | None) -> Principal | None:
        """Who the token belongs to if that is remembered; never reads the database (for the event loop)."""
        if not token:
            return None
        cached = self._cache.get(digest(token))
        return cached[1] if cached and cached[0] > time.monotonic() else None

    def lookup(self, token: str | None) -> Principal | None:
        if not token:
            return None
        if (principal := self.cached(token)) is not None:
            return principal
        key = digest(token)
        with self._db.read() as session:
            row = session.scalar(select(ApiToken).where(ApiToken.token_hash == key))
            if row is None:
                return None
            principal = Principal(row.user, row.role)
        self._cache[key] = (time.monotonic() + self.CACHE_SECONDS, principal)
        return principal


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects JobService calls without a valid user token before they reach a servicer.

    TrainerService calls need a token too; the servicer checks it against the job named in the request. On
    the grpc.aio server's event loop: a token not in the cache is looked up on a thread, not in the loop. A
    lookup that fails (the database cannot be reached) ends the call with that error raised in its handler's
    place, so the interceptor inside this one (api.errors' AsyncInternalErrors, see server.py) answers it as
    it answers a handler's: UNAVAILABLE or INTERNAL, with an id the log has."""

    def __init__(self, users: UserTokens):
        self._users = users

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(PUBLIC_SERVICE_PREFIXES):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and method.startswith(TRAINER_SERVICE_PREFIX):
            return await continuation(handler_call_details)
        try:
            known = token is not None and (self._users.cached(token)
                                           or await asyncio.to_thread(self._users.lookup, token))
        except Exception as exc:  # noqa: BLE001 (raised again in the handler's place)
            return _instead(await continuation(handler_call_details), _raise(exc))
        if known:
            return await continuation(handler_call_details)
        return _instead(await continuation(handler_call_details), _deny)


def _deny(_request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                  "a valid bearer token is required (metadata 'authorization: Bearer <token>')")


def _raise(error: Exception):
    def fail(_request, _context):
        raise error
    return fail


def _instead(handler, abort):
    """A handler of `handler`'s kind whose behaviour is `abort(request, context)`."""
    if handler is None:
        return None
    if handler.request_streaming or handler.response_streaming:
        if handler.response_streaming and not handler.request_streaming:
            return grpc.unary_stream_rpc_method_handler(
                abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        raise NotImplementedError("client-streaming methods are not part of the API")
    return grpc.unary_unary_rpc_method_handler(
        abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
