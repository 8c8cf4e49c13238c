"""All SQL that changes jobs. Each transition is one guarded statement over a batch.

A guard that fails returns nothing for that job: a newer attempt, a cancel or a replay won.
Every statement also appends its ``job_events`` rows, so history and state never disagree.
The fencing token of an attempt is ``(attempts, worker)``: a stale worker whose delivery was
reclaimed matches neither and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs import insertion
from app.jobs.newjob import NewJob

# Backoff in SQL so every path (failure, lost worker) uses the Postgres clock and one formula:
# attempt n waits base * 2^(n-1), capped, with "equal jitter" (between half and all of it).
_BACKOFF = (
    "least(CAST(:retry_max AS float8), CAST(:retry_base AS float8) * power(2, {n} - 1))"
    " * (0.5 + random() / 2)"
)
_OUT_OF_ATTEMPTS = "(j.attempts >= j.max_attempts)"
EPOCH_KEY_PREFIX = "redis-epoch:"  # conveyor_state keys of the Redis data epochs


@dataclass(frozen=True)
class Backoff:
    base_seconds: float
    max_seconds: float

    def params(self) -> dict[str, float]:
        return {"retry_base": self.base_seconds, "retry_max": self.max_seconds}


@dataclass(frozen=True)
class Target:
    """Where a queued job's stream entry goes."""

    id: UUID
    queue: str
    priority: int


@dataclass(frozen=True)
class Failure:
    job_id: UUID
    attempt: int
    error: dict[str, Any]  # {attempt, error, type, traceback, worker}; "at" is added in SQL
    permanent: bool = False


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


# -- worker hot path -----------------------------------------------------------------------------

_CLAIM = """
WITH locked AS (
    -- Look rows up by primary key only: "status || ''" keeps the planner from intersecting
    -- with the status index, which holds every queued job (a deep backlog).
    SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status || '' = 'queued'
    ORDER BY id FOR UPDATE
), claimed AS (
    UPDATE jobs j SET status = 'running', attempts = j.attempts + 1, worker = :worker,
        started_at = now(), next_attempt_at = NULL,
        lease_expires_at = now() + make_interval(secs => :lease)
    FROM locked WHERE j.id = locked.id AND j.status = 'queued'
    RETURNING j.*
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, 'claimed', attempts, worker FROM claimed
)
SELECT * FROM claimed
"""


async def claim_many(
    session: AsyncSession, ids: Sequence[UUID], worker: str, lease_seconds: float
) -> list[JobRow]:
    """queued → running for every id still queued; the rest were taken, cancelled or done."""
    if not ids:
        return []
    return await _jobs(
        session, _CLAIM, {"ids": list(ids), "worker": worker, "lease": lease_seconds}
    )


_SUCCEED = """
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]), CAST(:results AS text[]))
        AS v(id, attempt, result)
), done AS (
    UPDATE jobs j SET status = 'succeeded', result = CAST(v.result AS jsonb), finished_at = now(),
        worker = NULL, lease_expires_at = NULL
    FROM v WHERE j.id = v.id AND j.attempts = v.attempt AND j.status = 'running'
        AND j.worker = :worker
    RETURNING j.id, j.attempts
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, 'succeeded', attempts, :worker FROM done
)
SELECT id FROM done
"""


async def succeed_many(
    session: AsyncSession, worker: str, outcomes: Sequence[tuple[UUID, int, Any]]
) -> set[UUID]:
    """running → succeeded, guarded by (attempt, worker). Returns the ids that moved."""
    if not outcomes:
        return set()
    params = {
        "ids": [o[0] for o in outcomes],
        "attempts": [o[1] for o in outcomes],
        "results": [json.dumps(o[2]) for o in outcomes],
        "worker": worker,
    }
    return set((await session.scalars(text(_SUCCEED), params)).all())


_FAIL = f"""
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]),
                         CAST(:errors AS text[]), CAST(:permanent AS bool[]))
        AS v(id, attempt, error, permanent)
), failed AS (
    UPDATE jobs j SET
        status = CASE WHEN v.permanent OR {_OUT_OF_ATTEMPTS} THEN 'dead' ELSE 'retrying' END,
        errors = j.errors || jsonb_build_array(
            CAST(v.error AS jsonb) || jsonb_build_object('at', now())),
        next_attempt_at = CASE WHEN v.permanent OR {_OUT_OF_ATTEMPTS} THEN NULL
            ELSE now() + make_interval(secs => {_BACKOFF.format(n="j.attempts")}) END,
        finished_at = CASE WHEN v.permanent OR {_OUT_OF_ATTEMPTS} THEN now() END,
        worker = NULL, lease_expires_at = NULL
    FROM v WHERE j.id = v.id AND j.attempts = v.attempt AND j.status = 'running'
        AND j.worker = :worker
    RETURNING j.*
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, CASE WHEN status = 'dead' THEN 'dead' ELSE 'failed' END, attempts, :worker
    FROM failed
)
SELECT * FROM failed
"""


async def fail_many(
    session: AsyncSession, worker: str, failures: Sequence[Failure], backoff: Backoff
) -> list[JobRow]:
    """running → retrying (with backoff) or → dead. Returns the rows that moved."""
    if not failures:
        return []
    params = {
        "ids": [f.job_id for f in failures],
        "attempts": [f.attempt for f in failures],
        "errors": [json.dumps(f.error) for f in failures],
        "permanent": [f.permanent for f in failures],
        "worker": worker,
        **backoff.params(),
    }
    return await _jobs(session, _FAIL, params)


_HEARTBEAT = """
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS v(id, attempt)
), mine AS (
    SELECT j.id FROM jobs j JOIN v ON j.id = v.id AND j.attempts = v.attempt
    WHERE j.status = 'running' AND j.worker = :worker
    ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => :lease)
FROM mine WHERE j.id = mine.id
RETURNING j.id
"""


async def extend_leases(
    session: AsyncSession, worker: str, running: Sequence[tuple[UUID, int]], lease_seconds: float
) -> set[UUID]:
    """Keep the leases of our running attempts alive; returns the ids we still hold."""
    if not running:
        return set()
    params = {
        "ids": [r[0] for r in running],
        "attempts": [r[1] for r in running],
        "worker": worker,
        "lease": lease_seconds,
    }
    return set((await session.scalars(text(_HEARTBEAT), params)).all())


_RELEASE = """
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS v(id, attempt)
), released AS (
    UPDATE jobs j SET status = 'queued', attempts = j.attempts - 1, worker = NULL,
        lease_expires_at = NULL, started_at = NULL, enqueued_at = now(), dispatched_at = NULL
    FROM v WHERE j.id = v.id AND j.attempts = v.attempt AND j.status = 'running'
        AND j.worker = :worker
    RETURNING j.id, j.queue, j.priority, j.attempts
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, 'released', attempts + 1, :worker FROM released
)
SELECT id, queue, priority FROM released
"""


async def release_many(
    session: AsyncSession, worker: str, running: Sequence[tuple[UUID, int]]
) -> list[Target]:
    """running → queued on shutdown; the interrupted attempt does not count."""
    if not running:
        return []
    params = {"ids": [r[0] for r in running], "attempts": [r[1] for r in running], "worker": worker}
    result = await session.execute(text(_RELEASE), params)
    return [Target(r.id, r.queue, r.priority) for r in result]


_RECLAIM = f"""
WITH lost AS (
    SELECT id, worker AS lost_worker FROM jobs
    WHERE status = 'running' AND lease_expires_at < now()
      AND queue = ANY(CAST(:queues AS text[])) {{only}}
    ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs j SET
        status = CASE WHEN {_OUT_OF_ATTEMPTS} THEN 'dead' ELSE 'retrying' END,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'error', 'worker lost', 'type', 'WorkerLost',
            'worker', j.worker, 'at', now())),
        next_attempt_at = CASE WHEN {_OUT_OF_ATTEMPTS} THEN NULL
            ELSE now() + make_interval(secs => {_BACKOFF.format(n="j.attempts")}) END,
        finished_at = CASE WHEN {_OUT_OF_ATTEMPTS} THEN now() END,
        worker = NULL, lease_expires_at = NULL
    FROM lost WHERE j.id = lost.id
    RETURNING j.*, lost.lost_worker
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker, actor)
    SELECT id, CASE WHEN status = 'dead' THEN 'dead' ELSE 'reclaimed' END, attempts,
           lost_worker, :actor
    FROM upd
)
SELECT * FROM upd
"""


async def reclaim_expired(
    session: AsyncSession,
    actor: str,
    backoff: Backoff,
    queues: Sequence[str],
    *,
    ids: Sequence[UUID] | None = None,
    limit: int = 500,
) -> list[JobRow]:
    """running with a lapsed lease → the attempt failed with ``worker lost`` (retry or dead)."""
    only = "AND id = ANY(CAST(:ids AS uuid[]))" if ids is not None else ""
    params: dict[str, Any] = {
        "actor": actor,
        "limit": limit,
        "queues": list(queues),
        **backoff.params(),
    }
    if ids is not None:
        params["ids"] = list(ids)
    return await _jobs(session, _RECLAIM.format(only=only), params)


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
    limit: int = 500,
) -> list[JobRow]:
    """dead → queued with attempts reset and history kept. Two concurrent replays move it once."""
    where: list[str] = []
    params: dict[str, Any] = {"actor": actor, "limit": limit}
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
