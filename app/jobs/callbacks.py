"""Completion callbacks in Postgres: which deliveries are due, and what became of them.

A trigger (migration 0013) sets ``callback_status = 'pending'``, ``callback_turn + 1`` and
``callback_next_at = now()`` whenever a job with a ``callback_url`` finishes, whichever
statement finished it (a worker's completion, a reclaim, a cancel, ...). Workers then take due
deliveries with ``FOR UPDATE SKIP LOCKED`` (:func:`take_due`), which counts the attempt and
leases the delivery until ``callback_next_at``: a worker that dies mid-delivery leaves it due
again when the lease runs out. :func:`record` is fenced by (turn, attempt), so a late worker
changes nothing. Nothing here touches the job's own status: a callback never changes the
outcome (ADR 0017).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from app.jobs.repository import Backoff

_TAKE = """
WITH due AS (
    SELECT id FROM jobs
    WHERE callback_status = 'pending' AND callback_next_at <= now()
      AND finished_at IS NOT NULL AND queue = ANY($3::text[])
    ORDER BY callback_next_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs j SET callback_attempts = j.callback_attempts + 1,
    callback_next_at = now() + make_interval(secs => $2)
FROM due WHERE j.id = due.id
RETURNING j.id, j.type, j.queue, j.status, j.callback_url, j.callback_turn,
    j.callback_attempts, CAST(j.result AS text) AS result,
    CAST(j.errors -> -1 ->> 'error' AS text) AS error, j.attempts, j.max_attempts,
    j.created_at, j.started_at, j.finished_at
"""

# Backoff as for jobs (app.jobs.attempts): base * 2^(n-1), capped, with equal jitter. A failed
# delivery whose next try would fall past finished_at + the retry window is given up.
_RECORD = """
WITH b AS (
    SELECT least($7::float8, $6::float8 * power(2, greatest($3::int, 1) - 1))
        * (0.5 + random() / 2) AS wait
), v AS (
    SELECT j.id,
        CASE WHEN $4::text IS NULL THEN 'delivered'
             WHEN $5::bool OR now() + make_interval(secs => b.wait)
                 > j.finished_at + make_interval(secs => $8) THEN 'failed'
             ELSE 'pending' END AS status,
        b.wait
    FROM jobs j, b
    WHERE j.id = $1 AND j.callback_turn = $2 AND j.callback_attempts = $3
      AND j.callback_status = 'pending'
    FOR UPDATE OF j
)
UPDATE jobs j SET callback_status = v.status,
    callback_last_error = coalesce($4, j.callback_last_error),
    callback_next_at = CASE WHEN v.status = 'pending'
        THEN now() + make_interval(secs => v.wait) END
FROM v WHERE j.id = v.id
RETURNING j.callback_status
"""


@dataclass(frozen=True, slots=True)
class Due:
    """A delivery this worker holds: the job as the callback tells it."""

    id: UUID
    type: str
    queue: str
    status: str
    url: str
    turn: int
    attempt: int  # of the delivery
    result: str | None  # JSON text
    error: str | None  # the last error of the job, for dead and cancelled ones
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime

    @property
    def message_id(self) -> str:
        """``webhook-id``: the same on every retry of this turn; a replayed job that finishes
        again is a new turn."""
        return f"{self.id}_{self.turn}"

    def body(self) -> bytes:
        document: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "queue": self.queue,
            "status": self.status,
            "result": None if self.result is None else json.loads(self.result),
            "error": None if self.status == "succeeded" else self.error,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "created_at": self.created_at.isoformat(),
            "started_at": None if self.started_at is None else self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
        }
        return json.dumps(document, separators=(",", ":")).encode()


async def take_due(
    conn: asyncpg.Connection, queues: Sequence[str], limit: int, lease_seconds: float
) -> list[Due]:
    """Up to ``limit`` due deliveries of jobs of these queues, each counted as an attempt and
    leased for ``lease_seconds`` (rows other workers hold are skipped)."""
    rows = await conn.fetch(_TAKE, limit, lease_seconds, list(queues))
    return [Due(*r) for r in rows]


async def record(
    conn: asyncpg.Connection,
    due: Due,
    error: str | None,
    *,
    permanent: bool,
    backoff: Backoff,
    retry_seconds: float,
) -> str | None:
    """The outcome of one delivery attempt: ``delivered``, ``pending`` again (after a backoff)
    or ``failed`` (``permanent``, or out of the retry window); None when a newer attempt or
    turn has taken over."""
    status: str | None = await conn.fetchval(
        _RECORD,
        due.id,
        due.turn,
        due.attempt,
        error,
        permanent,
        backoff.base_seconds,
        backoff.max_seconds,
        retry_seconds,
    )
    return status
