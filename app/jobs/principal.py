"""Who is calling the API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """``scope`` namespaces idempotency keys; ``name`` is recorded as the actor and owner."""

    name: str | None
    scope: str
    admin: bool

    def sees(self, owner: str | None) -> bool:
        """May this caller see a job submitted by ``owner``? Admins (and everyone when auth
        is off) see every job; a producer key its own."""
        return self.admin or self.name is None or owner == self.name

    @property
    def view(self) -> dict[str, bool]:
        """The validation context of the API's output models: tracebacks and worker names,
        hosts and pids are for admins (and everyone when auth is off)."""
        return {"internals": self.admin}
