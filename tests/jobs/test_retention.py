"""Retention: the policy, the pruning pass against the migrated schema, and
``result_expires_at`` on the API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from pydantic import BaseModel

from app.db.url import asyncpg_dsn
from app.jobs import retention
from app.jobs.registry import JobContext, JobType, Registry, job_type
from app.jobs.retention import Policy
from app.jobs.status import JobStatus
from app.settings import Settings
from tests.conftest import Backends, make_settings, submit, wait_for_status

DAY = 86400.0


@pytest.fixture
async def conn(backends: Backends) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(backends.database_url))
    try:
        yield c
    finally:
        await c.close()


def policy(by_type: dict[str, dict[JobStatus, float]] | None = None) -> Policy:
    return Policy(
        {JobStatus.SUCCEEDED: 7 * DAY, JobStatus.CANCELLED: 7 * DAY, JobStatus.DEAD: 30 * DAY},
        by_type or {},
    )


def test_policy_per_status_type_and_forever() -> None:
    p = policy({"keep": {JobStatus.SUCCEEDED: 0}, "short": {JobStatus.DEAD: 60}})
    finished = datetime(2026, 1, 1, tzinfo=UTC)
    assert p.expires_at(JobStatus.SUCCEEDED, "any", finished) == finished + timedelta(days=7)
    assert p.expires_at(JobStatus.DEAD, "any", finished) == finished + timedelta(days=30)
    assert p.expires_at(JobStatus.DEAD, "short", finished) == finished + timedelta(seconds=60)
    assert p.expires_at(JobStatus.SUCCEEDED, "short", finished) == finished + timedelta(days=7)
    assert p.expires_at(JobStatus.SUCCEEDED, "keep", finished) is None
    assert p.expires_at(JobStatus.RUNNING, "any", None) is None
    assert p.expires_at(JobStatus.QUEUED, "any", finished) is None
    forever = Policy.of(Settings(retention_dead_seconds=0))
    assert forever.expires_at(JobStatus.DEAD, "any", finished) is None


class Nothing(BaseModel):
    pass


async def handler(payload: Nothing, ctx: JobContext) -> None:
    return None


def test_type_overrides_are_checked_at_registration() -> None:
    for bad in ({"running": 10}, {"succeeded": -1}, {"dead": "soon"}):
        with pytest.raises(ValueError, match="retention of"):
            job_type(f"t.{uuid.uuid4().hex[:6]}", retention=bad)(handler)  # type: ignore[arg-type]
    registry = Registry()
    registry.register(JobType("kept", Nothing, handler, None, "", retention={JobStatus.DEAD: 0}))
    policy = Policy.of(Settings(), registry)
    assert policy.seconds(JobStatus.DEAD, "kept") == 0
    assert policy.seconds(JobStatus.SUCCEEDED, "kept") == 7 * DAY


async def _finished(
    conn: asyncpg.Connection, type_: str, status: str, age_seconds: float, n: int = 1
) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    await conn.execute(
        "INSERT INTO jobs (id, type, queue, status, payload, idempotency_key, finished_at)"
        " SELECT id, $2, 'retention', $3, '{}', id::text,"
        "  now() - make_interval(secs => $4) FROM unnest($1::uuid[]) AS id",
        ids,
        type_,
        status,
        age_seconds,
    )
    await conn.execute(
        "INSERT INTO job_events (job_id, event, attempt) SELECT id, e, 0"
        " FROM unnest($1::uuid[]) AS id, unnest(ARRAY['submitted', 'claimed', $2]) AS e",
        ids,
        status,
    )
    return ids


async def _left(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> tuple[int, int]:
    jobs = await conn.fetchval("SELECT count(*) FROM jobs WHERE id = ANY($1)", ids)
    events = await conn.fetchval("SELECT count(*) FROM job_events WHERE job_id = ANY($1)", ids)
    return jobs, events


async def test_prune_deletes_expired_jobs_with_their_events_only(
    conn: asyncpg.Connection,
) -> None:
    t, keep, short = (f"r.{uuid.uuid4().hex[:8]}" for _ in range(3))
    old_ok = await _finished(conn, t, "succeeded", 8 * DAY, n=25)
    new_ok = await _finished(conn, t, "succeeded", 6 * DAY, n=3)
    old_cancelled = await _finished(conn, t, "cancelled", 8 * DAY, n=2)
    young_dead = await _finished(conn, t, "dead", 8 * DAY, n=2)  # dead: 30 days
    old_dead = await _finished(conn, t, "dead", 31 * DAY, n=2)
    kept_forever = await _finished(conn, keep, "succeeded", 400 * DAY, n=2)
    short_dead = await _finished(conn, short, "dead", 120, n=2)
    pending = await _finished(conn, t, "succeeded", 8 * DAY)
    await conn.execute(
        "UPDATE jobs SET callback_url = 'http://x/', callback_status = 'pending' WHERE id = $1",
        pending[0],
    )
    p = policy({keep: {JobStatus.SUCCEEDED: 0}, short: {JobStatus.DEAD: 60}})

    pruned = await retention.prune_pass(conn, p, batch=10)

    assert pruned.deleted[JobStatus.SUCCEEDED] >= 25
    for gone in (old_ok, old_cancelled, old_dead, short_dead):
        assert await _left(conn, gone) == (0, 0)
    for kept in (new_ok, young_dead, kept_forever, pending):
        assert await _left(conn, kept) == (len(kept), 3 * len(kept))
    # the idempotency key went with its job: it can be used again
    await conn.execute(
        "INSERT INTO jobs (id, type, queue, status, payload, idempotency_key)"
        " VALUES ($1, $2, 'retention', 'queued', '{}', $3)",
        uuid.uuid4(),
        t,
        str(old_ok[0]),
    )


async def test_one_worker_prunes_at_a_time(conn: asyncpg.Connection, backends: Backends) -> None:
    t = f"r.{uuid.uuid4().hex[:8]}"
    old = await _finished(conn, t, "succeeded", 8 * DAY, n=3)
    other = await asyncpg.connect(asyncpg_dsn(backends.database_url))
    try:
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock($1)", retention.PRUNE_LOCK)
            busy = await retention.prune_pass(conn, policy(), statuses=[JobStatus.SUCCEEDED])
            assert busy.busy and busy.total == 0
            assert await _left(conn, old) == (3, 9)
    finally:
        await other.close()
    done = await retention.prune_pass(conn, policy(), statuses=[JobStatus.SUCCEEDED])
    assert not done.busy and await _left(conn, old) == (0, 0)


async def test_the_prune_statements_use_the_finished_index(conn: asyncpg.Connection) -> None:
    """However small the table, the plans reach expired rows through ix_jobs_finished (with
    sequential scans priced out, as on a table of millions: scripts/bench_retention.py)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        types = await conn.fetch("EXPLAIN " + retention._TYPES, "succeeded")
        delete = await conn.fetch("EXPLAIN " + retention._DELETE, "succeeded", "x", 60.0, 10)
    delete = [r for r in delete if "pk_jobs" not in r[0]]  # the DELETE's own lookup by id
    for plan in (types, delete):
        scans = [r[0] for r in plan if " Scan using " in r[0] and " on jobs" in r[0]]
        assert scans and all("ix_jobs_finished" in line for line in scans), plan


async def test_result_expires_at_on_the_api(backends: Backends, spawn: object, queue: str) -> None:
    from app.main import create_app
    from tests.conftest import CLIENT_HEADERS
    from tests.support.processes import Spawner

    settings = make_settings(backends, retention_succeeded_seconds=3600)
    assert isinstance(spawn, Spawner)
    spawn.worker([queue], settings=settings)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as client:
            job = await submit(client, {"type": "demo.echo", "queue": queue})
            assert job["result_expires_at"] is None
            done = await wait_for_status(client, job["id"], {"succeeded"}, timeout=60)
            finished = datetime.fromisoformat(done["finished_at"])
            expires = datetime.fromisoformat(done["result_expires_at"])
            assert expires - finished == timedelta(seconds=3600)
            listed = (await client.get("/v1/jobs", params={"queue": queue})).json()["items"]
            assert listed[0]["result_expires_at"] == done["result_expires_at"]
