"""A schedule declared in code: ``@job_type("x", schedule="*/5 * * * *")`` or ``Periodic(...)``."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from app.errors import InvalidInput
from app.jobs.schemas import QUEUE_PATTERN
from app.schedules.cron import parse


@dataclass(frozen=True)
class Periodic:
    """How often a job type runs by itself. The schedule is named after the type."""

    cron: str
    timezone: str = "UTC"
    payload: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    missed: Literal["skip", "run_once"] = "skip"

    def check(self, type_name: str) -> None:
        """Fail at import, not at the first slot, when the declaration is wrong."""
        try:
            parse(self.cron, self.timezone)
        except InvalidInput as exc:
            raise ValueError(f"schedule of {type_name!r}: {exc.message}") from None
        if self.missed not in ("skip", "run_once"):
            raise ValueError(f"schedule of {type_name!r}: missed must be skip or run_once")
        if not re.match(QUEUE_PATTERN, self.queue) or not -1000 <= self.priority <= 1000:
            raise ValueError(f"schedule of {type_name!r}: bad queue name or priority")

    def digest(self, type_name: str, payload: dict[str, Any]) -> str:
        """What the declaration says, hashed: the sync writes a row only when this changes."""
        body = {**asdict(self), "payload": payload, "type": type_name}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
