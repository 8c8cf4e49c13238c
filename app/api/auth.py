"""API keys from ``CONVEYOR_API_KEYS``: comma-separated ``role:id:secret`` or ``role:secret``.

Roles: ``producer`` (submit, read and cancel its own jobs) and ``admin`` (everything). The
secret may be given as ``sha256:<hex>`` (its SHA-256 digest) instead of in the clear. Secrets
are compared as SHA-256 digests with :func:`hmac.compare_digest`. The gate
(:mod:`app.api.gate`) answers 401 for a missing or unknown key on ``/v1`` before anything
reads the request body; the route dependencies then decide the role (403).

Each key has an id, recorded as the owner of the jobs it submits and as the actor of the events
it causes (which other keys can see): the ``id`` of ``role:id:secret`` (letters, digits,
``_.-``; unique), or, for ``role:secret``, ``<role>-`` and 16 hex digits of an HMAC-SHA256 of
the secret's digest keyed with a random salt that Conveyor keeps in Postgres (``conveyor_state``)
— stable across restarts and processes, and not computable from the secret alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import Unauthenticated
from app.jobs import queries
from app.jobs.principal import Principal

log = logging.getLogger(__name__)

ROLES = ("producer", "admin")
OPEN = Principal(name=None, scope="", admin=True)
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SALT_STATE_KEY = "api-key-id-salt"


@dataclass(frozen=True)
class ApiKey:
    role: str
    digest: bytes
    id: str | None = None  # None: derived from the digest with the server's salt

    def principal(self, salt: bytes | None) -> Principal:
        ident = self.id
        if ident is None:
            if salt is None:
                raise RuntimeError("the API key id salt is not loaded")
            ident = f"{self.role}-{hmac.new(salt, self.digest, hashlib.sha256).hexdigest()[:16]}"
        return Principal(name=ident, scope=ident, admin=self.role == "admin")


def _digest(secret: str) -> bytes:
    if not secret.startswith("sha256:"):
        return hashlib.sha256(secret.encode()).digest()
    try:
        digest = bytes.fromhex(secret.removeprefix("sha256:"))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError("a sha256 API key digest must have 64 hex digits")
    return digest


def _parse_entry(entry: str) -> ApiKey:
    role, _, rest = entry.partition(":")
    if role not in ROLES or not rest:
        raise ValueError(
            "CONVEYOR_API_KEYS entries must be role:id:secret or role:secret (the secret may be"
            f" sha256:<hex>) with role in {ROLES}"
        )
    key_id: str | None = None
    if not rest.startswith("sha256:"):
        head, sep, tail = rest.partition(":")
        if sep and tail and KEY_ID.match(head):
            key_id, rest = head, tail
    return ApiKey(role, _digest(rest), key_id)


def parse_keys(spec: str | None) -> list[ApiKey]:
    """Parse the setting; a malformed entry is a start-up error (never silently open)."""
    keys = [_parse_entry(raw.strip()) for raw in (spec or "").split(",") if raw.strip()]
    ids = [k.id for k in keys if k.id is not None]
    if len(ids) != len(set(ids)):
        raise ValueError("CONVEYOR_API_KEYS: each key id may be used once")
    return keys


class Authenticator:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self._salt: bytes | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._loading = asyncio.Lock()
        if not keys:
            log.warning("CONVEYOR_API_KEYS is not set: the API accepts every request (no auth)")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def bind(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Where to keep the salt of the derived key ids (loaded on first use)."""
        self._sessions = sessions

    async def ready(self) -> None:
        """Load the id salt if a key needs it (once; a Postgres error propagates: 503)."""
        if self._salt is not None or all(k.id is not None for k in self.keys):
            return
        async with self._loading:
            if self._salt is None and self._sessions is not None:
                async with self._sessions.begin() as session:
                    value = await queries.state_value(
                        session, SALT_STATE_KEY, secrets.token_hex(32)
                    )
                self._salt = bytes.fromhex(value)

    def verify(self, secret: str | None) -> ApiKey | None:
        """The key whose secret this is (None with auth off); :class:`Unauthenticated` if none."""
        if not self.keys:
            return None
        if not secret:
            raise Unauthenticated("missing API key")
        digest = hashlib.sha256(secret.encode()).digest()
        found: ApiKey | None = None
        for key in self.keys:  # compare against every key: timing does not reveal which matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise Unauthenticated("unknown API key")
        return found

    def authenticate(self, secret: str | None) -> Principal:
        """The caller; call :meth:`ready` first."""
        key = self.verify(secret)
        return OPEN if key is None else key.principal(self._salt)

    async def principal(self, secret: str | None) -> Principal:
        """The caller: 401 (:class:`Unauthenticated`) before Postgres is asked for the salt."""
        key = self.verify(secret)
        if key is None:
            return OPEN
        if key.id is None and self._salt is None:
            await self.ready()
        return key.principal(self._salt)


def secret_from(authorization: str | None, api_key: str | None) -> str | None:
    """The secret of ``Authorization: Bearer <secret>``, else of ``X-API-Key``."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return api_key or None
