"""Who is calling the API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """``scope`` namespaces idempotency keys; ``name`` is recorded as the actor and owner."""

    name: str | None
    scope: str
    admin: bool
