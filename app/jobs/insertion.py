"""The submit path's SQL, on asyncpg directly: insert new jobs and find idempotent matches.

Arrays in, tuples out: no ORM objects and no JSON document of the rows. asyncpg prepares
each statement once per connection and caches it. One statement inserts the jobs and their
``submitted``/``scheduled`` events; a job whose idempotency key is taken is skipped, and
:func:`resolve` then pairs it with the job that holds the key (200) or refuses it (409).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from app.errors import Conflict
from app.jobs.newjob import NewJob

INSERT = """
WITH ins AS (
    INSERT INTO jobs (id, type, queue, status, priority, payload, max_attempts, timeout_seconds,
                      idempotency_key, idempotency_scope, request_hash, owner, run_at,
                      enqueued_at, callback_url)
    SELECT r.id, r.type, r.queue, r.status, r.priority, CAST(r.payload AS jsonb),
           r.max_attempts, r.timeout_seconds, r.idempotency_key, r.idempotency_scope,
           r.request_hash, r.owner, coalesce(r.run_at, now()),
           CASE WHEN r.status = 'queued' THEN now() END, r.callback_url
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
                $7::int[], $8::float8[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::timestamptz[], $14::text[]) WITH ORDINALITY
        AS r(id, type, queue, status, priority, payload, max_attempts, timeout_seconds,
             idempotency_key, idempotency_scope, request_hash, owner, run_at, callback_url,
             ord)
    ORDER BY r.ord
    ON CONFLICT (idempotency_scope, idempotency_key) WHERE idempotency_key IS NOT NULL
    DO NOTHING
    RETURNING id, status, owner, created_at, run_at
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, actor)
    SELECT id, CASE WHEN status = 'scheduled' THEN 'scheduled' ELSE 'submitted' END, 0, owner
    FROM ins
)
SELECT id, created_at, run_at FROM ins
"""

# json columns as text: the same answer whatever codecs the connection has
JOB_COLUMNS = """
j.id, j.type, j.queue, j.status, j.priority, CAST(j.payload AS text) AS payload,
CAST(j.result AS text) AS result, j.attempts, j.max_attempts, CAST(j.errors AS text) AS errors,
j.idempotency_key, j.idempotency_scope, j.request_hash, j.timeout_seconds, j.created_at,
j.run_at, j.started_at, j.finished_at, j.next_attempt_at, j.schedule, j.scheduled_for,
j.callback_url, j.callback_status, j.callback_attempts, j.callback_last_error
"""

_BY_KEYS = f"""
SELECT {JOB_COLUMNS} FROM jobs j
JOIN unnest($1::text[], $2::text[]) AS k(scope, key)
  ON j.idempotency_scope = k.scope AND j.idempotency_key = k.key
"""

Key = tuple[str, str]  # (idempotency scope, idempotency key)


@dataclass(frozen=True, slots=True)
class Submitted:
    """The answer to one submitted item: a job made now (``new`` with its ``created_at`` and
    ``run_at``), or the existing job that its idempotency key names (``row``)."""

    id: UUID
    created: bool
    new: NewJob | None = None
    created_at: datetime | None = None
    run_at: datetime | None = None
    row: Mapping[str, Any] | None = None


def columns(jobs: Sequence[NewJob]) -> list[list[Any]]:
    return [
        [j.id for j in jobs],
        [j.type for j in jobs],
        [j.queue for j in jobs],
        [j.status.value for j in jobs],
        [j.priority for j in jobs],
        [j.payload_json for j in jobs],
        [j.max_attempts for j in jobs],
        [j.timeout_seconds for j in jobs],
        [j.idempotency_key for j in jobs],
        [j.idempotency_scope for j in jobs],
        [j.request_hash for j in jobs],
        [j.owner for j in jobs],
        [j.run_at for j in jobs],
        [j.callback_url for j in jobs],
    ]


async def insert(
    conn: asyncpg.Connection, jobs: Sequence[NewJob]
) -> dict[UUID, tuple[datetime, datetime]]:
    """Insert the jobs; returns ``{id: (created_at, run_at)}`` of those inserted (a job whose
    idempotency key is taken already is skipped)."""
    rows = await conn.fetch(INSERT, *columns(jobs))
    return {row[0]: (row[1], row[2]) for row in rows}


async def find_by_keys(conn: asyncpg.Connection, keys: Sequence[Key]) -> dict[Key, Any]:
    """The jobs that hold these idempotency keys (json columns as text)."""
    if not keys:
        return {}
    rows = await conn.fetch(_BY_KEYS, [k[0] for k in keys], [k[1] for k in keys])
    return {(row["idempotency_scope"], row["idempotency_key"]): row for row in rows}


def missing_keys(jobs: Sequence[NewJob], inserted: Mapping[UUID, object]) -> list[Key]:
    """The keys of keyed jobs that were not inserted, and not named by another job that was."""
    taken = {_key(j) for j in jobs if j.id in inserted and j.idempotency_key is not None}
    keys = {_key(j) for j in jobs if j.id not in inserted and j.idempotency_key is not None}
    return sorted(keys - taken)


def _key(job: NewJob) -> Key:
    return (job.idempotency_scope, job.idempotency_key or "")


def resolve(
    jobs: Sequence[NewJob],
    inserted: Mapping[UUID, tuple[datetime, datetime]],
    existing: Mapping[Key, Any],
) -> list[Submitted | Conflict]:
    """Pair each job with its answer: created, a repeat of a job (200), or a conflict (409)."""
    firsts = {_key(j): j for j in jobs if j.id in inserted and j.idempotency_key is not None}
    answers: list[Submitted | Conflict] = []
    for job in jobs:
        times = inserted.get(job.id)
        if times is not None:
            answers.append(Submitted(job.id, True, job, *times))
            continue
        first = firsts.get(_key(job))
        if first is not None and first.request_hash == job.request_hash:
            created_at, run_at = inserted[first.id]
            answers.append(Submitted(first.id, False, first, created_at, run_at))
            continue
        row = existing.get(_key(job)) if first is None else None
        if row is not None and row["request_hash"] == job.request_hash:
            answers.append(Submitted(row["id"], False, row=row))
            continue
        answers.append(
            Conflict(
                "idempotency key was used with a different request",
                details={"idempotency_key": job.idempotency_key},
            )
        )
    return answers
