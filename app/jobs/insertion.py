"""The submit path's SQL, on asyncpg directly: insert new jobs and find idempotent matches.

Arrays in, tuples out: no ORM objects and no JSON document of the rows. asyncpg prepares
each statement once per connection and caches it. One statement inserts the jobs and their
``submitted``/``scheduled`` events; a job whose idempotency key is taken is skipped, and
:func:`resolve` then pairs it with the job that holds the key (200) or refuses it (409).

Debounce (``unique_key``): a waiting job holds ``(scope, type, unique_key)`` in the partial
unique index ``uq_jobs_unique_waiting`` until it starts, is cancelled, or its ``unique_until``
passes. A job skipped because a live holder has its key is answered with that holder (200).
If the holder's time is up, :func:`find_holders` releases it (clears ``unique_until``) and the
job is inserted again in another round; so is one whose holder started meanwhile. The index,
not a check before the insert, decides between concurrent submissions. Without a
``unique_key`` in the group nothing of this runs: one round, as before.

A batch (its own transaction) of many jobs with neither kind of key is written with ``COPY``
instead (:func:`copy`): nothing in it can conflict, and Postgres takes rows faster by COPY
than through the INSERT's arrays (docs/performance.md). The autocommitted groups of single
submissions keep the INSERT: one round trip, where COPY needs a transaction and four.
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
from app.jobs.status import JobStatus

INSERT = """
WITH ins AS (
    INSERT INTO jobs (id, type, queue, status, priority, payload, max_attempts, timeout_seconds,
                      idempotency_key, idempotency_scope, request_hash, owner, run_at,
                      enqueued_at, unique_key, unique_until, callback_url,
                      traceparent)
    SELECT r.id, r.type, r.queue, r.status, r.priority, CAST(r.payload AS jsonb),
           r.max_attempts, r.timeout_seconds, r.idempotency_key, r.idempotency_scope,
           r.request_hash, r.owner, coalesce(r.run_at, now()),
           CASE WHEN r.status = 'queued' THEN now() END, r.unique_key,
           CASE WHEN r.unique_key IS NULL THEN NULL
                WHEN r.unique_for IS NULL THEN CAST('infinity' AS timestamptz)
                ELSE now() + make_interval(secs => r.unique_for) END,
           r.callback_url, r.traceparent
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
                $7::int[], $8::float8[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::timestamptz[], $14::text[], $15::float8[], $16::text[],
                $17::text[]) WITH ORDINALITY
        AS r(id, type, queue, status, priority, payload, max_attempts, timeout_seconds,
             idempotency_key, idempotency_scope, request_hash, owner, run_at, unique_key,
             unique_for, callback_url, traceparent, ord)
    ORDER BY r.ord
    -- any unique index: the idempotency key (uq_jobs_idempotency) or the debounce key of a
    -- waiting job (uq_jobs_unique_waiting); resolve() tells which
    ON CONFLICT DO NOTHING
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
j.cancel_requested_at, j.unique_key,
j.callback_url, j.callback_status, j.callback_attempts, j.callback_last_error
"""

_BY_KEYS = f"""
SELECT {JOB_COLUMNS} FROM jobs j
JOIN unnest($1::text[], $2::text[]) AS k(scope, key)
  ON j.idempotency_scope = k.scope AND j.idempotency_key = k.key
"""

# The live holders of these debounce keys; expired ones are released in the same statement
# (it reads the snapshot from before its own update, hence the filter on unique_until).
_HOLDERS = f"""
WITH k AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(scope, type, key)
), expired AS (
    UPDATE jobs j SET unique_until = NULL FROM k
    WHERE j.idempotency_scope = k.scope AND j.type = k.type AND j.unique_key = k.key
      AND j.unique_until IS NOT NULL AND j.unique_until <= now()
    RETURNING j.id
)
SELECT {JOB_COLUMNS} FROM jobs j
JOIN k ON j.idempotency_scope = k.scope AND j.type = k.type AND j.unique_key = k.key
WHERE j.unique_until > now()
"""

Key = tuple[str, str]  # (idempotency scope, idempotency key)
UniqueKey = tuple[str, str, str]  # (idempotency scope, type, unique key)
MAX_ROUNDS = 5  # inserts of one job whose debounce key's holder keeps going away


@dataclass(slots=True)  # not frozen: built once per job (see NewJob)
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
        [j.unique_key for j in jobs],
        [j.unique_for_seconds for j in jobs],
        [j.callback_url for j in jobs],
        [j.traceparent for j in jobs],
    ]


# Below this many jobs the INSERT's one round trip beats COPY's three (now(), two COPYs).
COPY_AT_LEAST = 64
_COPY_JOB_COLUMNS = (
    "id", "type", "queue", "status", "priority", "payload", "max_attempts", "timeout_seconds",
    "idempotency_scope", "owner", "run_at", "enqueued_at", "callback_url", "traceparent",
)  # fmt: skip
_COPY_EVENT_COLUMNS = ("job_id", "event", "attempt", "actor")


def copyable(jobs: Sequence[NewJob]) -> bool:
    """Whether :func:`copy` may write these jobs: enough of them, and no idempotency or
    debounce key, so that no unique index can refuse one (their ids are new UUIDv7s)."""
    return len(jobs) >= COPY_AT_LEAST and all(
        j.idempotency_key is None and j.unique_key is None for j in jobs
    )


async def insert(
    conn: asyncpg.Connection, jobs: Sequence[NewJob]
) -> dict[UUID, tuple[datetime, datetime]]:
    """Insert the jobs; returns ``{id: (created_at, run_at)}`` of those inserted (a job whose
    idempotency key is taken already is skipped)."""
    if conn.is_in_transaction() and copyable(jobs):  # a batch, not a group (see above)
        return await copy(conn, jobs)
    rows = await conn.fetch(INSERT, *columns(jobs))
    return {row[0]: (row[1], row[2]) for row in rows}


async def copy(
    conn: asyncpg.Connection, jobs: Sequence[NewJob]
) -> dict[UUID, tuple[datetime, datetime]]:
    """What :data:`INSERT` does for jobs without keys, with ``COPY``: the rows with the values
    the INSERT would compute (``now()`` is the transaction's start, as the INSERT's
    ``created_at`` default is), then their ``submitted``/``scheduled`` events, in the
    caller's transaction (all of them or none)."""
    if not conn.is_in_transaction():
        raise RuntimeError("insertion.copy runs in the caller's transaction")
    now: datetime = await conn.fetchval("SELECT now()")
    await conn.copy_records_to_table(
        "jobs",
        columns=_COPY_JOB_COLUMNS,
        records=[
            (
                j.id,
                j.type,
                j.queue,
                j.status.value,
                j.priority,
                j.payload_json,
                j.max_attempts,
                j.timeout_seconds,
                j.idempotency_scope,
                j.owner,
                j.run_at or now,
                now if j.status == JobStatus.QUEUED else None,
                j.callback_url,
                j.traceparent,
            )
            for j in jobs
        ],
    )
    await conn.copy_records_to_table(
        "job_events",
        columns=_COPY_EVENT_COLUMNS,
        records=[
            (j.id, "scheduled" if j.status == JobStatus.SCHEDULED else "submitted", 0, j.owner)
            for j in jobs
        ],
    )
    return {j.id: (now, j.run_at or now) for j in jobs}


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


def missing_unique(jobs: Sequence[NewJob], inserted: Mapping[UUID, object]) -> list[UniqueKey]:
    """The debounce keys of jobs that were not inserted, and not named by one that was."""
    taken = {_ukey(j) for j in jobs if j.id in inserted and j.unique_key is not None}
    keys = {_ukey(j) for j in jobs if j.id not in inserted and j.unique_key is not None}
    return sorted(keys - taken)


def _ukey(job: NewJob) -> UniqueKey:
    return (job.idempotency_scope, job.type, job.unique_key or "")


async def find_holders(conn: asyncpg.Connection, keys: Sequence[UniqueKey]) -> dict[UniqueKey, Any]:
    """The waiting jobs that hold these debounce keys now; holders whose time is up are
    released (so the next insert of the key succeeds)."""
    if not keys:
        return {}
    rows = await conn.fetch(
        _HOLDERS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    )
    return {(row["idempotency_scope"], row["type"], row["unique_key"]): row for row in rows}


Answer = Submitted | Conflict


async def insert_resolved(conn: asyncpg.Connection, jobs: Sequence[NewJob]) -> list[Answer]:
    """Insert the jobs and answer each: created, the job its idempotency key or debounce key
    names (200), or a conflict (409). Jobs whose debounce key was freed meanwhile are inserted
    again, up to MAX_ROUNDS times in all."""
    answers: list[Answer | None] = [None] * len(jobs)
    todo = list(range(len(jobs)))
    for _ in range(MAX_ROUNDS):
        batch = [jobs[i] for i in todo]
        inserted = await insert(conn, batch)
        missing = missing_keys(batch, inserted)
        existing = await find_by_keys(conn, missing) if missing else {}
        contended = missing_unique(batch, inserted)
        holders = await find_holders(conn, contended) if contended else {}
        again = []
        for i, answer in zip(todo, resolve(batch, inserted, existing, holders), strict=True):
            if answer is None:
                again.append(i)
            else:
                answers[i] = answer
        if not again:
            break
        todo = again
    return [
        a
        if a is not None
        else Conflict("unique_key is contended; retry", details={"unique_key": j.unique_key})
        for a, j in zip(answers, jobs, strict=True)
    ]


def resolve(
    jobs: Sequence[NewJob],
    inserted: Mapping[UUID, tuple[datetime, datetime]],
    existing: Mapping[Key, Any],
    holders: Mapping[UniqueKey, Any] | None = None,
) -> list[Answer | None]:
    """Pair each job with its answer: created, a repeat of a job (200), a job its debounce key
    names (200), or a conflict (409); None: its debounce key has no holder now (insert again)."""
    firsts = {_key(j): j for j in jobs if j.id in inserted and j.idempotency_key is not None}
    held = {_ukey(j): j for j in jobs if j.id in inserted and j.unique_key is not None}
    answers: list[Answer | None] = []
    for job in jobs:
        times = inserted.get(job.id)
        if times is not None:
            answers.append(Submitted(job.id, True, job, *times))
            continue
        if job.idempotency_key is not None:
            answer = _by_idempotency(job, firsts, inserted, existing)
            if answer is not None or job.unique_key is None:
                answers.append(answer or _reused(job))
                continue
        if job.unique_key is None:  # skipped, though no unique index names it: as a reuse
            answers.append(_reused(job))
            continue
        answers.append(_by_unique(job, held, inserted, holders or {}))
    return answers


def _by_idempotency(
    job: NewJob,
    firsts: Mapping[Key, NewJob],
    inserted: Mapping[UUID, tuple[datetime, datetime]],
    existing: Mapping[Key, Any],
) -> Answer | None:
    """The job that holds ``job``'s idempotency key, or a conflict; None: no job holds it."""
    first = firsts.get(_key(job))
    if first is not None:
        if first.request_hash != job.request_hash:
            return _reused(job)
        return Submitted(first.id, False, first, *inserted[first.id])
    row = existing.get(_key(job))
    if row is None:
        return None
    if row["request_hash"] != job.request_hash:
        return _reused(job)
    return Submitted(row["id"], False, row=row)


def _by_unique(
    job: NewJob,
    held: Mapping[UniqueKey, NewJob],
    inserted: Mapping[UUID, tuple[datetime, datetime]],
    holders: Mapping[UniqueKey, Any],
) -> Submitted | None:
    first = held.get(_ukey(job))
    if first is not None:
        return Submitted(first.id, False, first, *inserted[first.id])
    row = holders.get(_ukey(job))
    return None if row is None else Submitted(row["id"], False, row=row)


def _reused(job: NewJob) -> Conflict:
    return Conflict(
        "idempotency key was used with a different request",
        details={"idempotency_key": job.idempotency_key},
    )
