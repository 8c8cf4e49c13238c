"""Cancel requests and RetryLater deferrals in the attempt's statements (real Postgres):
which outcome wins, what the history shows, and that every write stays fenced."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from app.db.engine import create_engine, create_session_factory
from app.db.url import asyncpg_dsn as dsn
from app.jobs import attempts, repository, unknown_type
from app.jobs.attempts import Completion
from app.jobs.repository import Backoff
from app.settings import Settings
from workers.execution import cancelled, error_record

NO_WAIT = Backoff(0.0, 0.0)


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(dsn(settings.database_url))
    try:
        yield c
    finally:
        await c.close()


async def _running(conn: asyncpg.Connection, queue: str, max_attempts: int = 3) -> attempts.Claim:
    job_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO jobs (id, type, queue, status, payload, max_attempts, enqueued_at)"
        " VALUES ($1, 'demo.echo', $2, 'queued', '{}', $3, now())",
        job_id,
        queue,
        max_attempts,
    )
    [claim] = await attempts.claim_many(conn, [job_id], "w1", 30.0)
    return claim


async def _request_cancel(settings: Settings, job_id: UUID, actor: str | None) -> bool:
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine).begin() as session:
            return await repository.request_cancel(session, job_id, actor) is not None
    finally:
        await engine.dispose()


async def _row(conn: asyncpg.Connection, job_id: UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT status, attempts, deferrals, result, errors::text AS errors, next_attempt_at,"
        " finished_at, cancel_requested_at, cancel_requested_by FROM jobs WHERE id = $1",
        job_id,
    )
    assert row is not None
    return row


async def _events(conn: asyncpg.Connection, job_id: UUID) -> list[tuple[str, int, str | None]]:
    rows = await conn.fetch(
        "SELECT event, attempt, actor FROM job_events WHERE job_id = $1 ORDER BY id", job_id
    )
    return [(r["event"], r["attempt"], r["actor"]) for r in rows]


def _failure(claim: attempts.Claim) -> Completion:
    return Completion(claim.id, claim.token, None, error_record(claim.attempt, "w1", "x", "E"))


async def test_a_cancel_request_is_recorded_once_and_the_heartbeat_reports_it(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    claim = await _running(conn, queue)
    other = await _running(conn, queue)
    running = [(claim.id, claim.token), (other.id, other.token)]
    assert (await attempts.extend_leases(conn, "w1", running, 30.0)).cancel == set()
    assert await _request_cancel(settings, claim.id, "ops")
    assert not await _request_cancel(settings, claim.id, "someone-else")  # asked already
    leases = await attempts.extend_leases(conn, "w1", running, 30.0)
    assert leases.held == set(running)
    assert leases.cancel == {(claim.id, claim.token)}
    row = await _row(conn, claim.id)
    assert row["status"] == "running" and row["cancel_requested_by"] == "ops"
    assert await _events(conn, claim.id) == [("claimed", 1, None), ("cancel_requested", 1, "ops")]


async def test_the_stopped_attempt_ends_cancelled_with_its_actor(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    claim = await _running(conn, queue)
    # Without a request, a "cancelled" outcome is fenced off (it could never be reported).
    assert await attempts.complete_many(conn, "w1", [cancelled(claim)], NO_WAIT) == (set(), [])
    assert await _request_cancel(settings, claim.id, "ops")
    stale = Completion(claim.id, claim.token - 1, None, cancelled=True)
    assert await attempts.complete_many(conn, "w1", [stale], NO_WAIT) == (set(), [])
    moved, _ = await attempts.complete_many(conn, "w1", [cancelled(claim)], NO_WAIT)
    assert moved == {claim.id}
    row = await _row(conn, claim.id)
    assert (row["status"], row["result"], row["errors"]) == ("cancelled", None, "[]")
    assert row["finished_at"] is not None and row["next_attempt_at"] is None
    assert (await _events(conn, claim.id))[-1] == ("cancelled", 1, "ops")


async def test_an_attempt_that_finished_first_keeps_its_outcome(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    ok = await _running(conn, queue)
    last = await _running(conn, queue, max_attempts=1)
    for claim in (ok, last):
        assert await _request_cancel(settings, claim.id, "ops")
    await attempts.complete_many(
        conn, "w1", [Completion(ok.id, ok.token, '{"done": 1}'), _failure(last)], NO_WAIT
    )
    done = await _row(conn, ok.id)
    assert (done["status"], json.loads(done["result"])) == ("succeeded", {"done": 1})
    assert done["cancel_requested_at"] is not None
    assert (await _row(conn, last.id))["status"] == "dead"  # its last attempt failed: dead


async def test_a_failure_with_attempts_left_is_not_retried_after_a_cancel_request(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    claim = await _running(conn, queue, max_attempts=3)
    assert await _request_cancel(settings, claim.id, "ops")
    await attempts.complete_many(conn, "w1", [_failure(claim)], NO_WAIT)
    row = await _row(conn, claim.id)
    assert (row["status"], row["next_attempt_at"]) == ("cancelled", None)
    assert len(json.loads(row["errors"])) == 1  # the failure stays in the history


async def test_a_reclaimed_or_released_job_with_a_cancel_request_ends_cancelled(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    lost = await _running(conn, queue)
    handed = await _running(conn, queue)
    for claim in (lost, handed):
        assert await _request_cancel(settings, claim.id, "ops")
    await conn.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1s' WHERE id = $1", lost.id
    )
    [reclaimed] = await attempts.reclaim_expired(conn, "w2", NO_WAIT, [queue], ids=[lost.id])
    assert reclaimed.status == "cancelled"
    assert (await _row(conn, lost.id))["next_attempt_at"] is None
    assert (await _events(conn, lost.id))[-1] == ("cancelled", 1, "ops")
    # A worker shutting down hands its attempts back; this one is not sent again.
    assert await attempts.release_many(conn, "w1", [(handed.id, handed.token)]) == []
    assert (await _row(conn, handed.id))["status"] == "cancelled"
    assert (await _events(conn, handed.id))[-1] == ("cancelled", 1, "ops")
    # Neither can be claimed again.
    assert await attempts.claim_many(conn, [lost.id, handed.id], "w3", 30.0) == []


def _defer(claim: attempts.Claim, seconds: float) -> Completion:
    error = error_record(claim.attempt, "w1", f"retry in {seconds:g}s", "RetryLater")
    return Completion(claim.id, claim.token, None, error, defer_seconds=seconds)


async def test_a_deferral_spends_no_attempt_and_is_no_failure(
    conn: asyncpg.Connection, queue: str
) -> None:
    claim = await _running(conn, queue, max_attempts=1)
    moved, dead = await attempts.complete_many(conn, "w1", [_defer(claim, 30)], NO_WAIT)
    assert moved == {claim.id} and dead == []
    row = await _row(conn, claim.id)
    assert (row["status"], row["attempts"], row["deferrals"], row["errors"]) == (
        "retrying",
        0,
        1,
        "[]",
    )
    wait = await conn.fetchval(
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM jobs WHERE id = $1", claim.id
    )
    assert 25 < wait <= 30
    assert await _events(conn, claim.id) == [("claimed", 1, None), ("deferred", 1, None)]
    # It runs again as attempt 1, with a new token (the deferred one is fenced off).
    await conn.execute("UPDATE jobs SET status = 'queued' WHERE id = $1", claim.id)
    [again] = await attempts.claim_many(conn, [claim.id], "w1", 30.0)
    assert (again.attempt, again.token) == (1, claim.token + 1)


async def test_deferrals_past_the_budget_count_as_failed_attempts(
    conn: asyncpg.Connection, queue: str
) -> None:
    claim = await _running(conn, queue, max_attempts=2)
    for _ in range(2):
        await attempts.complete_many(conn, "w1", [_defer(claim, 0)], NO_WAIT, max_deferrals=2)
        await conn.execute("UPDATE jobs SET status = 'queued' WHERE id = $1", claim.id)
        [claim] = await attempts.claim_many(conn, [claim.id], "w1", 30.0)
        assert claim.attempt == 1
    await attempts.complete_many(conn, "w1", [_defer(claim, 0)], NO_WAIT, max_deferrals=2)
    row = await _row(conn, claim.id)
    assert (row["status"], row["attempts"]) == ("retrying", 1)
    [error] = json.loads(row["errors"])
    assert error["type"] == "RetryLater" and error["error"].startswith("deferred more than 2")
    assert (await _events(conn, claim.id))[-1] == ("failed", 1, None)
    await conn.execute("UPDATE jobs SET status = 'queued' WHERE id = $1", claim.id)
    [claim] = await attempts.claim_many(conn, [claim.id], "w1", 30.0)
    _, dead = await attempts.complete_many(conn, "w1", [_defer(claim, 0)], NO_WAIT, max_deferrals=2)
    assert [d.id for d in dead] == [claim.id]  # the second attempt was the last


async def test_a_deferral_after_a_cancel_request_ends_cancelled(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    claim = await _running(conn, queue)
    assert await _request_cancel(settings, claim.id, "ops")
    await attempts.complete_many(conn, "w1", [_defer(claim, 30)], NO_WAIT)
    row = await _row(conn, claim.id)
    assert (row["status"], row["attempts"]) == ("cancelled", 1)


async def test_an_unknown_type_is_not_handed_back_after_a_cancel_request(
    conn: asyncpg.Connection, settings: Settings, queue: str
) -> None:
    claim = await _running(conn, queue)
    assert await _request_cancel(settings, claim.id, "ops")
    error = error_record(claim.attempt, "w1", "unknown job type", "UnknownType")
    outcome = Completion(claim.id, claim.token, None, error, unknown_type=True)
    moved, dead = await unknown_type.hand_back(conn, "w1", [outcome], 600.0)
    assert moved == {claim.id} and dead == []
    row = await _row(conn, claim.id)
    assert (row["status"], row["next_attempt_at"]) == ("cancelled", None)
    assert (await _events(conn, claim.id))[-1] == ("cancelled", 1, "ops")
