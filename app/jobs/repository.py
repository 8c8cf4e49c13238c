"""All SQL that changes jobs. Each transition is one guarded statement over a batch.

A guard that fails returns nothing for that job: a newer attempt, a cancel or a replay won.
Every statement also appends its ``job_events`` rows, so history and state never disagree.
The worker's transitions of an attempt (claim to outcome) are in :mod:`app.jobs.attempts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs import insertion
from app.jobs.newjob import NewJob

EPOCH_KEY_PREFIX = "redis-epoch:"  # conveyor_state keys of the Redis data epochs


@dataclass(frozen=True)
class Backoff:
    """Retry delays: attempt n waits base * 2^(n-1) seconds, capped, with equal jitter."""

    base_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class Target:
    """Where a queued job's stream entry goes."""

    id: UUID
    queue: str
    priority: int


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


_EPOCHS_SHARED = "SELECT FROM conveyor_state WHERE starts_with(key, :epochs) FOR SHARE"
_CONFIRM = """
UPDATE jobs j SET dispatched_at = now()
FROM unnest(CAST(:ids AS uuid[]), CAST(:ages AS float8[])) AS v(id, age)
WHERE j.id = v.id AND j.status = 'queued' AND j.dispatched_at IS NULL
  AND j.enqueued_at <= statement_timestamp() - make_interval(secs => v.age)
  AND NOT EXISTS (
      SELECT FROM conveyor_state s WHERE starts_with(s.key, :epochs)
      AND s.updated_at > statement_timestamp() - make_interval(secs => v.age))
"""


async def confirm_dispatched(
    session: AsyncSession,
    ids: Sequence[UUID],
    sent_ago: Sequence[float],
    redis_prefix: str,
) -> None:
    """Record that the stream entries of these jobs exist (the dispatch marker).

    ``sent_ago``: seconds since each XADD was sent. A job queued again after its XADD (it ran,
    failed and was promoted meanwhile) is left unmarked: that entry was for its previous turn,
    and the sweep must send it again. So is every job sent before a loss of Redis data was
    detected (a data epoch of ``redis_prefix`` recorded since): its entry may be gone, and the
    loss's re-dispatch may have run already.
    """
    if ids:
        epochs = f"{EPOCH_KEY_PREFIX}{redis_prefix}:"
        # Serialise with a data-loss record (record_epoch updates these rows): one in flight
        # is waited for, so the UPDATE's fresh snapshot sees it; one that comes later waits
        # for our commit, and the re-dispatch that follows it sees our marks.
        await session.execute(text(_EPOCHS_SHARED), {"epochs": epochs})
        params = {"ids": list(ids), "ages": list(sent_ago), "epochs": epochs}
        await session.execute(text(_CONFIRM), params)


async def unmark_dispatched(session: AsyncSession, ids: Sequence[UUID]) -> None:
    """These queued jobs' entries are about to be deleted: until a new send is confirmed, the
    sweep must treat them as never sent."""
    if ids:
        await session.execute(
            text(
                "UPDATE jobs SET dispatched_at = NULL"
                " WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'"
            ),
            {"ids": list(ids)},
        )


# Claim, complete, heartbeat, release and reclaim (the worker's transitions of an attempt) are
# in app/jobs/attempts.py, on asyncpg directly.


# -- maintenance ---------------------------------------------------------------------------------

_PROMOTE = """
WITH due AS (
    SELECT id FROM jobs
    WHERE ((status = 'scheduled' AND run_at <= now())
           OR (status = 'retrying' AND next_attempt_at <= now()))
      AND queue = ANY(CAST(:queues AS text[]))
    LIMIT :limit FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs j SET status = 'queued', enqueued_at = now(), dispatched_at = NULL
    FROM due WHERE j.id = due.id
    RETURNING j.id, j.queue, j.priority, j.attempts
), ev AS (
    INSERT INTO job_events (job_id, event, attempt) SELECT id, 'promoted', attempts FROM upd
)
SELECT id, queue, priority FROM upd
"""


async def promote_due(
    session: AsyncSession, queues: Sequence[str], limit: int = 1000
) -> list[Target]:
    """scheduled/retrying whose time has come → queued. Safe with many workers (SKIP LOCKED)."""
    result = await session.execute(text(_PROMOTE), {"limit": limit, "queues": list(queues)})
    return [Target(r.id, r.queue, r.priority) for r in result]


async def lock_undispatched(
    session: AsyncSession, queues: Sequence[str], grace_seconds: float, limit: int = 1000
) -> list[Target]:
    """Queued jobs whose stream entry was never confirmed; locked until the caller commits."""
    result = await session.execute(
        text(
            "SELECT id, queue, priority FROM jobs WHERE status = 'queued'"
            " AND dispatched_at IS NULL AND queue = ANY(CAST(:queues AS text[]))"
            " AND enqueued_at < now() - make_interval(secs => :grace)"
            " ORDER BY enqueued_at LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"grace": grace_seconds, "limit": limit, "queues": list(queues)},
    )
    return [Target(r.id, r.queue, r.priority) for r in result]


def epoch_key(redis_prefix: str, queue: str, partition: int) -> str:
    """The ``conveyor_state`` key of a queue partition's Redis data epoch."""
    return f"{EPOCH_KEY_PREFIX}{redis_prefix}:{queue}:{partition}"


async def record_epoch(session: AsyncSession, key: str, epoch: str) -> bool:
    """Remember the Redis data epoch; True when it differs from the one recorded before
    (or none was), which means Redis may have lost entries since."""
    changed = await session.scalar(
        text(
            "INSERT INTO conveyor_state (key, value) VALUES (:key, :epoch)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()"
            " WHERE conveyor_state.value <> excluded.value RETURNING key"
        ),
        {"key": key, "epoch": epoch},
    )
    return changed is not None


async def forget_dispatches(session: AsyncSession, queues: Sequence[str]) -> int:
    """After Redis lost data: every queued job of these queues must be sent again.

    Call it after :func:`record_epoch` in the same transaction: confirmations in flight
    (which share-lock the epoch rows) have committed by then, so their marks are cleared too.
    """
    result = await session.execute(
        text(
            "UPDATE jobs SET dispatched_at = NULL WHERE status = 'queued'"
            " AND dispatched_at IS NOT NULL AND queue = ANY(CAST(:queues AS text[]))"
        ),
        {"queues": list(queues)},
    )
    return int(getattr(result, "rowcount", 0) or 0)


# -- operator transitions ----------------------------------------------------------------------

_CANCEL = """
WITH c AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now(), next_attempt_at = NULL
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


_REPLAY = """
WITH r AS (
    SELECT id FROM jobs WHERE status = 'dead' AND dlq_removed_at IS NULL {where}
    ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs j SET status = 'queued', attempts = 0, result = NULL, finished_at = NULL,
        started_at = NULL, next_attempt_at = NULL, enqueued_at = now(), dispatched_at = NULL
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
    dead_before: datetime | None = None,
    limit: int = 500,
) -> list[JobRow]:
    """dead → queued with attempts reset and history kept. Two concurrent replays move it once.

    ``dead_before``: only jobs that went dead no later than this (Postgres clock).
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
