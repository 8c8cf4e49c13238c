"""The claim token: every claim raises it, nothing lowers it, and every statement of an
attempt is fenced by it (real Postgres)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from app.db.url import asyncpg_dsn as dsn
from app.jobs import attempts
from app.jobs.attempts import Completion
from app.jobs.repository import Backoff
from app.settings import Settings
from workers.execution import error_record

NO_WAIT = Backoff(0.0, 0.0)


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(dsn(settings.database_url))
    try:
        yield c
    finally:
        await c.close()


async def _queued(conn: asyncpg.Connection, queue: str, max_attempts: int = 3) -> UUID:
    job_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO jobs (id, type, queue, status, payload, max_attempts, enqueued_at)"
        " VALUES ($1, 'demo.echo', $2, 'queued', '{}', $3, now())",
        job_id,
        queue,
        max_attempts,
    )
    return job_id


async def _replay(conn: asyncpg.Connection, job_id: UUID) -> None:
    """What ``repository.replay`` does to the row (dead → queued, attempts reset)."""
    await conn.execute(
        "UPDATE jobs SET status = 'queued', attempts = 0, finished_at = NULL,"
        " enqueued_at = now() WHERE id = $1 AND status = 'dead'",
        job_id,
    )


async def test_a_replayed_job_claimed_by_the_same_worker_fences_off_the_old_attempt(
    conn: asyncpg.Connection, queue: str
) -> None:
    job_id = await _queued(conn, queue, max_attempts=1)
    [old] = await attempts.claim_many(conn, [job_id], "w1", 30.0)
    await conn.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1s' WHERE id = $1", job_id
    )
    [lost] = await attempts.reclaim_expired(conn, "w2", NO_WAIT, [queue], ids=[job_id])
    assert lost.status == "dead"
    await _replay(conn, job_id)
    [new] = await attempts.claim_many(conn, [job_id], "w1", 30.0)
    assert (new.attempt, new.token) == (old.attempt, old.token + 1)  # same (attempts, worker)

    stale = Completion(job_id, old.token, '"stale"')
    assert (await attempts.extend_leases(conn, "w1", [(job_id, old.token)], 30.0)).held == set()
    assert await attempts.release_many(conn, "w1", [(job_id, old.token)]) == []
    assert await attempts.complete_many(conn, "w1", [stale], NO_WAIT) == (set(), [])
    assert await conn.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "running"

    fresh = Completion(job_id, new.token, '"fresh"')
    assert (await attempts.complete_many(conn, "w1", [fresh], NO_WAIT))[0] == {job_id}
    row = await conn.fetchrow("SELECT status, result FROM jobs WHERE id = $1", job_id)
    assert (row["status"], row["result"]) == ("succeeded", '"fresh"')


async def test_release_gives_the_attempt_back_but_never_its_token(
    conn: asyncpg.Connection, queue: str
) -> None:
    job_id = await _queued(conn, queue)
    [first] = await attempts.claim_many(conn, [job_id], "w1", 30.0)
    [released] = await attempts.release_many(conn, "w1", [(job_id, first.token)])
    assert released.id == job_id
    [second] = await attempts.claim_many(conn, [job_id], "w1", 30.0)
    assert (second.attempt, second.token) == (first.attempt, first.token + 1)
    error = error_record(first.attempt, "w1", "boom", "RuntimeError")
    stale = Completion(job_id, first.token, None, error)
    assert await attempts.complete_many(conn, "w1", [stale], NO_WAIT) == (set(), [])
    assert await conn.fetchval("SELECT errors FROM jobs WHERE id = $1", job_id) == "[]"


async def test_reclaim_leaves_the_callers_live_attempts_alone(
    conn: asyncpg.Connection, queue: str
) -> None:
    mine, theirs = await _queued(conn, queue), await _queued(conn, queue)
    [a] = await attempts.claim_many(conn, [mine], "w1", 30.0)
    await attempts.claim_many(conn, [theirs], "w1", 30.0)
    await conn.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1s' WHERE id = ANY($1::uuid[])",
        [mine, theirs],
    )
    # w1 runs `mine` (its live attempt) but no longer `theirs` (e.g. a previous process
    # with the same name): only `theirs` is reclaimed, even by w1 itself.
    lost = await attempts.reclaim_expired(conn, "w1", NO_WAIT, [queue], live=[(mine, a.token)])
    assert [r.id for r in lost] == [theirs]
    assert await conn.fetchval("SELECT status FROM jobs WHERE id = $1", mine) == "running"


async def test_progress_is_fenced_like_every_write_of_the_attempt(
    conn: asyncpg.Connection, queue: str
) -> None:
    job_id = await _queued(conn, queue)
    [old] = await attempts.claim_many(conn, [job_id], "w1", 30.0)
    assert await attempts.write_progress(conn, "w1", [(job_id, old.token, _p(0.2))]) == {job_id}
    await attempts.release_many(conn, "w1", [(job_id, old.token)])
    [new] = await attempts.claim_many(conn, [job_id], "w2", 30.0)
    assert await _progress(conn, job_id) is None, "a new attempt starts without progress"

    # the stale attempt (an older token, on the old worker or the new one) changes nothing
    assert await attempts.write_progress(conn, "w1", [(job_id, old.token, _p(0.9))]) == set()
    assert await attempts.write_progress(conn, "w2", [(job_id, old.token, _p(0.9))]) == set()
    # nor does the right token from another worker
    assert await attempts.write_progress(conn, "w1", [(job_id, new.token, _p(0.9))]) == set()
    assert await _progress(conn, job_id) is None

    assert await attempts.write_progress(conn, "w2", [(job_id, new.token, _p(0.5))]) == {job_id}
    assert await _progress(conn, job_id) == {"value": 0.5, "message": "half"}
    done = Completion(job_id, new.token, '"ok"')
    assert (await attempts.complete_many(conn, "w2", [done], NO_WAIT))[0] == {job_id}
    # after the outcome, a late write of the same attempt is fenced too
    assert await attempts.write_progress(conn, "w2", [(job_id, new.token, _p(0.1))]) == set()
    assert await _progress(conn, job_id) == {"value": 0.5, "message": "half"}


def _p(value: float) -> str:
    return json.dumps({"value": value, "message": "half"})


async def _progress(conn: asyncpg.Connection, job_id: UUID) -> object:
    raw = await conn.fetchval("SELECT progress::text FROM jobs WHERE id = $1", job_id)
    return None if raw is None else json.loads(raw)


_OUTCOME = (
    "SELECT j.status, j.result, j.attempts, j.worker, j.lease_expires_at, j.next_attempt_at,"
    " j.finished_at IS NOT NULL AS finished, j.errors, j.deferrals,"
    " (SELECT array_agg(e.event || ':' || e.attempt || ':' || coalesce(e.worker, '-')"
    "         ORDER BY e.id) FROM job_events e WHERE e.job_id = j.id) AS events"
    " FROM jobs j WHERE j.id = $1"
)


async def test_a_batch_of_successes_records_what_a_mixed_batch_records(
    conn: asyncpg.Connection, queue: str
) -> None:
    """A batch where every attempt succeeded takes a leaner statement. Its rows, events and
    answer are those of a success written beside a failure (the general statement), and it
    is fenced the same way: another worker's report, or a stale token, moves nothing."""
    alone, beside, failing = [await _queued(conn, queue) for _ in range(3)]
    claims = {c.id: c for c in await attempts.claim_many(conn, [alone, beside, failing], "w1", 30)}

    other_worker = Completion(alone, claims[alone].token, '{"n": 1}')
    assert await attempts.complete_many(conn, "w2", [other_worker], NO_WAIT) == (set(), [])
    stale = Completion(alone, claims[alone].token - 1, '{"n": 1}')
    assert await attempts.complete_many(conn, "w1", [stale], NO_WAIT) == (set(), [])

    ages: dict[UUID, float] = {}
    ok = Completion(alone, claims[alone].token, '{"n": 1}')
    assert await attempts.complete_many(conn, "w1", [ok], NO_WAIT, ages=ages) == ({alone}, [])
    mixed = [
        Completion(beside, claims[beside].token, '{"n": 1}'),
        Completion(
            failing,
            claims[failing].token,
            None,
            error=error_record(1, "w1", "boom", "RuntimeError"),
        ),
    ]
    moved, _ = await attempts.complete_many(conn, "w1", mixed, NO_WAIT, ages=ages)
    assert moved == {beside, failing}
    assert set(ages) == {alone, beside}  # the retrying job is not terminal
    assert all(age >= 0 for age in ages.values())

    first, second = [dict(await conn.fetchrow(_OUTCOME, i)) for i in (alone, beside)]
    assert first == second
    assert first["status"] == "succeeded" and json.loads(first["result"]) == {"n": 1}
    assert first["events"] == ["claimed:1:w1", "succeeded:1:w1"]
    assert (first["worker"], first["lease_expires_at"]) == (None, None)
