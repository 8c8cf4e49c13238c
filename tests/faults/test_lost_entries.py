"""Stream entries lost while Redis keeps its data epoch: no queued job may wait forever.

The epoch check catches a Redis that lost everything (its marker key is gone, or its run id is
new). These are the losses it cannot see: a stream key deleted (an operator's ``DEL``) or
evicted (``allkeys-*`` maxmemory) while the marker survives. A missing consumer group, met
anywhere, counts as such a loss: that queue's dispatch marks are forgotten and its queued jobs
sent again.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
from redis.asyncio import Redis

from app.main import create_app
from app.settings import Settings
from app.streams.keys import Keys
from tests.faults.checker import drain, stranded
from tests.faults.harness import Supervisor, create_effects_table, dsn, served_before
from tests.support.processes import Spawner


async def submit_marked(
    settings: Settings, bodies: list[dict[str, object]], *, marked: bool = True
) -> list[uuid.UUID]:
    """Submit through the API (XADD, then the batched confirmation); with ``marked``, check
    that the confirmations were written (the jobs are known to have stream entries)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as http:
            response = await http.post("/v1/jobs/batch", json={"jobs": bodies})
            assert response.status_code == 202, response.text
            ids = [uuid.UUID(j["id"]) for j in response.json()["jobs"]]
    if not marked:
        return ids
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL",
            ids,
        )
    finally:
        await conn.close()
    assert count == len(ids), "the API did not confirm its XADDs"
    return ids


async def statuses(settings: Settings, ids: list[uuid.UUID]) -> list[str]:
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        rows = await conn.fetch("SELECT status FROM jobs WHERE id = ANY($1::uuid[])", ids)
    finally:
        await conn.close()
    return sorted(r["status"] for r in rows)


def one_per_band(queue: str) -> list[dict[str, object]]:
    return [
        {"type": "test.effect", "queue": queue, "priority": p, "payload": {"sleep_ms": 5}}
        for p in (1, 0, -1)
    ]


async def test_streams_deleted_while_no_worker_runs(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    """The issue's reproduction: a worker created the groups and stopped; three jobs were
    submitted and confirmed; their three band streams were deleted (the epoch marker kept);
    a worker starts: all three must run."""
    await create_effects_table(settings.database_url)
    await served_before(spawn, settings, queue)
    ids = await submit_marked(settings, one_per_band(queue))
    keys = Keys(settings.redis_prefix)
    async with Redis.from_url(settings.redis_url) as redis:
        assert await redis.delete(*keys.partition_streams(queue, 0)) == 3
        assert await redis.exists(keys.epoch(queue, 0))
    workers = Supervisor(spawn, [queue], 1)
    workers.start()
    await drain(settings.database_url, queue, timeout=20.0)
    await workers.stop()
    assert await statuses(settings, ids) == ["succeeded"] * 3


async def test_streams_deleted_under_a_busy_worker(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    """A worker that is busy (not reading) when the streams of waiting jobs are deleted: its
    reconcile notices the missing groups without waiting for a read to fail."""
    await create_effects_table(settings.database_url)
    workers = Supervisor(spawn, [queue], 1, concurrency=1)
    workers.start()
    await workers.ready(settings.database_url)
    [nap] = await submit_marked(
        settings, [{"type": "test.nap", "queue": queue, "payload": {"seconds": 6.0}}], marked=False
    )
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        for _ in range(200):
            if await conn.fetchval("SELECT status FROM jobs WHERE id = $1", nap) == "running":
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    ids = await submit_marked(settings, one_per_band(queue))
    keys = Keys(settings.redis_prefix)
    async with Redis.from_url(settings.redis_url) as redis:
        assert await redis.delete(*keys.partition_streams(queue, 0)) >= 3
    # While the nap runs the worker reads nothing; a later read would meet NOGROUP, but the
    # marks must be forgotten before that (within a reconcile period), not by luck.
    assert await stranded(settings, queue) == {}
    await drain(settings.database_url, queue, timeout=20.0)
    await workers.stop()
    assert await statuses(settings, ids) == ["succeeded"] * 3
