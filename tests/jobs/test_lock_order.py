"""Statements that lock many queued jobs at once take the row locks in id order, as the claim
does, so none of them deadlocks with a worker's claims on a backlog: the dispatch
confirmation, the re-dispatch after a Redis data loss (``forget_dispatches``) and the hold of
a paused queue's deliveries. Real statements on real connections, concurrently."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.db.url import asyncpg_dsn as dsn
from app.flow import claim as flow
from app.jobs import attempts, marks
from app.jobs.ids import new_job_id
from tests.conftest import Backends

JOBS = 3000
CLAIM_BATCH = 100


async def _backlog(conn: asyncpg.Connection, queue: str) -> list[uuid.UUID]:
    """Queued, dispatched jobs stored in shuffled order: the heap's order is not the ids'."""
    ids = [new_job_id() for _ in range(JOBS)]
    stored = random.sample(ids, len(ids))
    await conn.execute(
        "INSERT INTO jobs (id, type, queue, status, payload, enqueued_at, dispatched_at)"
        " SELECT i, 'demo.echo', $2, 'queued', '{}', now() - interval '1 minute', now()"
        " FROM unnest($1::uuid[]) i",
        stored,
        queue,
    )
    return ids


async def _race(
    backends: Backends, other: Callable[[list[uuid.UUID], str], Awaitable[None]]
) -> None:
    """Claims (shuffled batches, as deliveries come) against ``other`` until the backlog is
    claimed; a deadlock on either side fails the test."""
    queue = f"locks-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn(backends.database_url))
    claimer = await asyncpg.connect(dsn(backends.database_url))
    try:
        ids = await _backlog(conn, queue)
        order = random.sample(ids, len(ids))

        async def claims() -> None:
            for k in range(0, len(order), CLAIM_BATCH):
                await attempts.claim_many(claimer, order[k : k + CLAIM_BATCH], "w-locks", 60)

        async def others() -> None:
            while await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'queued'", queue
            ):
                await other(random.sample(ids, len(ids)), queue)

        await asyncio.wait_for(asyncio.gather(claims(), others()), timeout=120)
        left = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE queue = $1 AND status <> 'running'", queue
        )
        assert left == 0
    finally:
        await conn.close()
        await claimer.close()


@pytest.fixture
async def sessions(backends: Backends) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(backends.database_url, pool_size=1)
    try:
        yield async_sessionmaker(engine)
    finally:
        await engine.dispose()


async def test_redispatch_after_a_loss_does_not_deadlock_with_claims(
    backends: Backends, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async def forget(_: list[uuid.UUID], queue: str) -> None:
        async with sessions.begin() as session:
            await marks.forget_dispatches(session, [queue])

    await _race(backends, forget)


async def test_dispatch_confirmation_does_not_deadlock_with_claims(
    backends: Backends, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async def unmark_then_confirm(ids: list[uuid.UUID], queue: str) -> None:
        async with sessions.begin() as session:
            await marks.forget_dispatches(session, [queue])
        sent = [marks.Sent(i, 0.0, "1-0") for i in ids[:1000]]
        async with sessions.begin() as session:
            await marks.confirm_dispatched(session, sent, "locks")

    await _race(backends, unmark_then_confirm)


async def test_holding_a_paused_queues_jobs_does_not_deadlock_with_claims(
    backends: Backends,
) -> None:
    conn = await asyncpg.connect(dsn(backends.database_url))

    async def hold(ids: list[uuid.UUID], _: str) -> None:
        await flow.hold(conn, ids[:1000])

    try:
        await _race(backends, hold)
    finally:
        await conn.close()
