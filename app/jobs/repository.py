"""All SQL that changes jobs. Each transition is one guarded statement over a batch.

A guard that fails returns nothing for that job: a newer attempt, a cancel or a replay won.
Every statement also appends its ``job_events`` rows, so history and state never disagree.
The worker's transitions of an attempt (claim to outcome) are in :mod:`app.jobs.attempts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs import insertion
from app.jobs.newjob import NewJob


@dataclass(frozen=True)
class Backoff:
    """Retry delays: attempt n waits base * 2^(n-1) seconds, capped, with equal jitter."""

    base_seconds: float
    max_seconds: float


@dataclass(slots=True)  # not frozen: built once per job (see NewJob)
class Target:
    """Where a queued job's stream entry goes."""

    id: UUID
    queue: str
    priority: int
    traceparent: str | None = None  # carried in the entry (field ``tp``) when tracing is on


async def _jobs(session: AsyncSession, sql: str, params: dict[str, Any]) -> list[JobRow]:
    stmt = select(JobRow).from_statement(text(sql))
    return list((await session.scalars(stmt, params)).all())


# -- submit ------------------------------------------------------------------------------------


async def insert_jobs(session: AsyncSession, jobs: Sequence[NewJob]) -> list[NewJob]:
    """Insert new jobs in the session's transaction; returns those inserted (a job whose
    idempotency key is taken already is skipped). The API's submit path runs the same
    statement on asyncpg directly (:mod:`app.jobs.insertion`)."""
    conn = await session.connection()
    result = await conn.exec_driver_sql(insertion.INSERT, tuple(insertion.columns(jobs)))
    inserted = {row[0] for row in result}
    return [job for job in jobs if job.id in inserted]


# Claim, complete, heartbeat, release and reclaim (the worker's transitions of an attempt) are
# in app/jobs/attempts.py, on asyncpg directly.


# -- maintenance ---------------------------------------------------------------------------------

# Per queue and kind, oldest due first, in the order of the (queue, time) indexes: a LIMIT
# over an unordered OR let the planner pick a table scan that walks every job of the queue
# not yet due (a million scheduled for later cost 1.5 s a poll).
_PROMOTE = """
WITH due AS (
    SELECT s.id FROM unnest(CAST(:queues AS text[])) AS q(queue) CROSS JOIN LATERAL (
        SELECT id FROM jobs WHERE status = 'scheduled' AND queue = q.queue AND run_at <= now()
        ORDER BY run_at LIMIT :limit FOR UPDATE SKIP LOCKED
    ) AS s
    UNION ALL
    SELECT r.id FROM unnest(CAST(:queues AS text[])) AS q(queue) CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE status = 'retrying' AND queue = q.queue AND next_attempt_at <= now()
        ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED
    ) AS r
), upd AS (
    UPDATE jobs j SET status = 'queued', enqueued_at = now(), dispatched_at = NULL
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.queue, j.priority, j.attempts
), ev AS (
    INSERT INTO job_events (job_id, event, attempt) SELECT id, 'promoted', attempts FROM upd
)
SELECT id, queue, priority FROM upd
"""


# What a worker's poll has to do: due scheduled or retrying jobs of its queues (promotion),
# and due slots of their schedules (the due check). One prepared statement on the worker's
# asyncpg pool: an idle worker polls four times a second, and this way each poll is one
# statement, not two ORM transactions around the locking work. The job probes are ordered
# like _PROMOTE, for the same reason: the (queue, time) indexes, never a walk of the jobs
# not yet due.
_DUE = """
SELECT EXISTS (
    SELECT FROM unnest($1::text[]) AS q(queue) CROSS JOIN LATERAL (
        SELECT FROM jobs WHERE status = 'scheduled' AND queue = q.queue AND run_at <= now()
        ORDER BY run_at LIMIT 1
    ) AS s
) OR EXISTS (
    SELECT FROM unnest($1::text[]) AS q(queue) CROSS JOIN LATERAL (
        SELECT FROM jobs
        WHERE status = 'retrying' AND queue = q.queue AND next_attempt_at <= now()
        ORDER BY next_attempt_at LIMIT 1
    ) AS r
), EXISTS (
    SELECT FROM schedules WHERE enabled AND next_run_at <= now() AND queue = ANY($1::text[])
)
"""


class Due(NamedTuple):
    """What a poll of these queues would find."""

    jobs: bool  # a scheduled or retrying job is due: what :func:`promote_due` takes
    slots: bool  # an enabled schedule has a slot due: what ``schedules.lock_due`` locks


async def due_work(conn: asyncpg.Connection, queues: Sequence[str]) -> Due:
    """Whether promotion and the schedules' due check have work, locked rows included."""
    row = await conn.fetchrow(_DUE, list(queues))
    assert row is not None
    return Due(bool(row[0]), bool(row[1]))


async def promote_due(
    session: AsyncSession, queues: Sequence[str], limit: int = 1000
) -> list[Target]:
    """scheduled/retrying whose time has come → queued, up to ``limit`` of each kind per
    queue, oldest due first. Safe with many workers (SKIP LOCKED)."""
    result = await session.execute(text(_PROMOTE), {"limit": limit, "queues": list(queues)})
    return [Target(r.id, r.queue, r.priority) for r in result]


# -- operator transitions ----------------------------------------------------------------------

_CANCEL = """
WITH c AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now(), next_attempt_at = NULL,
        unique_until = NULL
    WHERE id = :id AND status IN ('queued', 'scheduled', 'retrying')
    RETURNING *
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, actor)
    SELECT id, 'cancelled', attempts, :actor FROM c
)
SELECT * FROM c
"""


async def cancel(session: AsyncSession, job_id: UUID, actor: str | None) -> JobRow | None:
    """queued/scheduled/retrying → cancelled; a later delivery finds it cancelled and drops it."""
    rows = await _jobs(session, _CANCEL, {"id": job_id, "actor": actor})
    return rows[0] if rows else None


# Only the first request of a running job is recorded (its time and actor, and one event).
_REQUEST_CANCEL = """
WITH c AS (
    UPDATE jobs SET cancel_requested_at = now(), cancel_requested_by = :actor
    WHERE id = :id AND status = 'running' AND cancel_requested_at IS NULL
    RETURNING *
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, actor)
    SELECT id, 'cancel_requested', attempts, :actor FROM c
)
SELECT * FROM c
"""


async def request_cancel(session: AsyncSession, job_id: UUID, actor: str | None) -> JobRow | None:
    """running → running with ``cancel_requested_at``: its worker sees it at its next
    heartbeat, stops the handler and reports ``cancelled`` (unless the attempt ended first).
    None when the job is not running or a cancel was requested already."""
    rows = await _jobs(session, _REQUEST_CANCEL, {"id": job_id, "actor": actor})
    return rows[0] if rows else None


_REPLAY = """
WITH r AS (
    SELECT id FROM jobs WHERE status = 'dead' AND dlq_removed_at IS NULL {where}
    ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs j SET status = 'queued', attempts = 0, result = NULL, finished_at = NULL,
        started_at = NULL, next_attempt_at = NULL, enqueued_at = now(), dispatched_at = NULL,
        cancel_requested_at = NULL, cancel_requested_by = NULL, deferrals = 0
    FROM r WHERE j.id = r.id AND j.status = 'dead'
    RETURNING j.*
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, actor) SELECT id, 'replayed', 0, :actor FROM upd
)
SELECT * FROM upd
"""


async def replay(
    session: AsyncSession,
    actor: str | None,
    *,
    ids: Sequence[UUID] | None = None,
    type: str | None = None,
    queue: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    dead_before: datetime | None = None,
    limit: int = 500,
) -> list[JobRow]:
    """dead → queued with attempts reset and history kept. Two concurrent replays move it once.

    ``dead_before``: only jobs that went dead no later than this (Postgres clock).
    ``created_after``/``created_before``: only jobs created in that range (bounds excluded).
    """
    where: list[str] = []
    params: dict[str, Any] = {"actor": actor, "limit": limit}
    if dead_before is not None:
        where.append("AND finished_at <= :dead_before")
        params["dead_before"] = dead_before
    if ids is not None:
        where.append("AND id = ANY(CAST(:ids AS uuid[]))")
        params["ids"] = list(ids)
    if type is not None:
        where.append("AND type = :type")
        params["type"] = type
    if queue is not None:
        where.append("AND queue = :queue")
        params["queue"] = queue
    if created_after is not None:
        where.append("AND created_at > :created_after")
        params["created_after"] = created_after
    if created_before is not None:
        where.append("AND created_at < :created_before")
        params["created_before"] = created_before
    return await _jobs(session, _REPLAY.format(where=" ".join(where)), params)


_DLQ_REMOVE = """
WITH d AS (
    UPDATE jobs SET dlq_removed_at = now()
    WHERE id = :id AND status = 'dead' AND dlq_removed_at IS NULL
    RETURNING id, attempts
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, actor)
    SELECT id, 'dlq_removed', attempts, :actor FROM d
)
SELECT id FROM d
"""


async def remove_from_dlq(session: AsyncSession, job_id: UUID, actor: str | None) -> bool:
    return (await session.scalar(text(_DLQ_REMOVE), {"id": job_id, "actor": actor})) is not None
