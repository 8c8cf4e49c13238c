"""API keys from ``CONVEYOR_API_KEYS``: comma-separated ``role:secret`` or ``role:sha256:<hex>``.

Roles: ``producer`` (submit, read and cancel its own jobs) and ``admin`` (everything).
Secrets are compared as SHA-256 digests with :func:`hmac.compare_digest`. The gate
(:mod:`app.api.gate`) answers 401 for a missing or unknown key on ``/v1`` before anything
reads the request body; the route dependencies then decide the role (403).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from app.errors import Unauthenticated
from app.jobs.principal import Principal

log = logging.getLogger(__name__)

ROLES = ("producer", "admin")
OPEN = Principal(name=None, scope="", admin=True)


@dataclass(frozen=True)
class ApiKey:
    role: str
    digest: bytes

    @property
    def principal(self) -> Principal:
        ident = f"{self.role}:{self.digest.hex()[:12]}"
        return Principal(name=ident, scope=ident, admin=self.role == "admin")


def parse_keys(spec: str | None) -> list[ApiKey]:
    """Parse the setting; a malformed entry is a start-up error (never silently open)."""
    keys: list[ApiKey] = []
    for raw in (spec or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        role, _, secret = entry.partition(":")
        if role not in ROLES or not secret:
            raise ValueError(
                "CONVEYOR_API_KEYS entries must be role:secret or role:sha256:<hex>"
                f" with role in {ROLES}"
            )
        if secret.startswith("sha256:"):
            digest = bytes.fromhex(secret.removeprefix("sha256:"))
            if len(digest) != 32:
                raise ValueError("a sha256 API key digest must have 64 hex digits")
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        keys.append(ApiKey(role, digest))
    return keys


class Authenticator:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        if not keys:
            log.warning("CONVEYOR_API_KEYS is not set: the API accepts every request (no auth)")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, secret: str | None) -> Principal:
        if not self.keys:
            return OPEN
        if not secret:
            raise Unauthenticated("missing API key")
        digest = hashlib.sha256(secret.encode()).digest()
        found: ApiKey | None = None
        for key in self.keys:  # compare against every key: timing does not reveal which matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise Unauthenticated("unknown API key")
        return found.principal


def secret_from(authorization: str | None, api_key: str | None) -> str | None:
    """The secret of ``Authorization: Bearer <secret>``, else of ``X-API-Key``."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return api_key or None
