"""Safe trimming: a backlog larger than CONVEYOR_STREAM_MAXLEN never costs a job.

The dispatch script adds entries only while the stream holds fewer than the bound; what does
not fit stays undispatched in Postgres (``dispatched_at`` NULL) and is sent by the workers'
dispatch sweep as entries are acked and deleted. So the stream stays within the bound and no
entry, delivered or not, is ever trimmed away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis

from app.db.engine import create_engine, create_session_factory
from app.db.url import asyncpg_dsn
from app.jobs import repository
from app.jobs.newjob import NewJob
from app.main import create_app
from app.settings import Settings
from app.streams.keys import DEFAULT_BAND, GROUP, HIGH_BAND, LOW_BAND, Keys, partition_for
from tests.conftest import Backends, make_settings
from tests.faults.checker import conclude, open_jobs
from tests.faults.harness import (
    Ledger,
    LoadGenerator,
    Supervisor,
    create_effects_table,
    effect_body,
    orphan_row,
)
from tests.support import db
from tests.support.processes import Spawner

MAXLEN = 100
JOBS = 500


async def test_backlog_beyond_maxlen_stays_bounded_and_completes(
    backends: Backends, queue: str, results: Path, tmp_path: Path
) -> None:
    settings = make_settings(backends, stream_maxlen=MAXLEN, claim_idle_seconds=2.0)
    await create_effects_table(settings.database_url)
    rng = random.Random(9)
    ledger = Ledger()
    app = create_app(settings)
    async with app.router.lifespan_context(app):  # no worker runs yet
        transport = httpx.ASGITransport(app=app)
        gen = LoadGenerator(ledger, "http://conveyor", transport=transport)
        await gen.run([effect_body(queue, rng) for _ in range(JOBS)], 1000.0)
    assert ledger.count("ok") == JOBS
    streams = Keys(settings.redis_prefix).queue_streams(queue, settings.partitions)
    async with Redis.from_url(settings.redis_url) as redis:
        assert sum([await redis.xlen(s) for s in streams]) == MAXLEN
        waiting = await db.fetchval(
            settings.database_url,
            "SELECT count(*) FROM jobs WHERE queue = $1 AND dispatched_at IS NULL",
            queue,
        )
        assert waiting == JOBS - MAXLEN  # the rest waits in Postgres, not in Redis

        spawn = Spawner(settings, tmp_path)
        try:
            workers = Supervisor(spawn, [queue], 2)
            workers.start()
            longest, deadline = 0, time.monotonic() + 120
            while await open_jobs(settings.database_url, queue) and time.monotonic() < deadline:
                longest = max([longest] + [await redis.xlen(s) for s in streams])
                await asyncio.sleep(0.02)
            report = await conclude(
                "trim_backlog",
                settings.database_url,
                queue,
                ledger,
                workers,
                results,
                maxlen=MAXLEN,
                xlen_max=longest,
            )
        finally:
            spawn.stop_all()
        after = [await redis.xlen(s) for s in streams]
        pending = [(await redis.xpending(s, GROUP))["pending"] for s in streams]
    assert report.statuses == {"succeeded": JOBS}
    assert longest <= MAXLEN
    assert after == [0, 0, 0] and pending == [0, 0, 0]  # finished entries are acked and deleted


async def test_a_full_stream_holds_back_no_other_stream(
    backends: Backends, queue: str, tmp_path: Path
) -> None:
    """The undispatched sweep makes progress for every stream that has room: 2,200 unsent jobs
    bound for full streams (every low-band stream, and partition 0's default band) are older
    than a high-priority job and a default-band job of partition 1, whose first XADD failed.
    Both must be sent at once, not after the 2,200 (which cannot move while the only worker is
    busy and reads nothing)."""
    settings = make_settings(backends, stream_maxlen=MAXLEN, partitions=2)
    await create_effects_table(settings.database_url)
    keys = Keys(settings.redis_prefix)
    spawn = Spawner(settings, tmp_path)
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    try:
        workers = Supervisor(spawn, [queue], 1, concurrency=1)
        workers.start()
        await workers.ready(settings.database_url)
        await _keep_busy(settings, queue)
        full = [keys.stream(queue, p, LOW_BAND) for p in (0, 1)]
        full.append(keys.stream(queue, 0, DEFAULT_BAND))
        async with Redis.from_url(settings.redis_url) as redis:
            for stream in full:
                while await redis.xlen(stream) < MAXLEN:
                    await redis.xadd(stream, {"job": str(uuid.uuid4())})
        blockers = [_orphan(queue, -1, None) for _ in range(1100)]
        blockers += [_orphan(queue, 0, 0) for _ in range(1100)]
        async with sessions.begin() as session:
            await repository.insert_jobs(session, blockers)
        probes = [_orphan(queue, 5, None), _orphan(queue, 0, 1)]
        async with sessions.begin() as session:
            await repository.insert_jobs(session, probes)
        conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
        try:
            for _ in range(100):
                marked = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[])"
                    " AND dispatched_at IS NOT NULL",
                    [p.id for p in probes],
                )
                if marked == len(probes):
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert marked == len(probes), "a job for a stream with room waited behind full streams"
        async with Redis.from_url(settings.redis_url, decode_responses=True) as redis:
            for stream in full:
                assert await redis.xlen(stream) == MAXLEN
            high_id = str(probes[0].id)
            high = keys.stream(queue, partition_for(uuid.UUID(high_id), 2), HIGH_BAND)
            assert [(e or {}).get("job") for _, e in await redis.xrange(high) or []] == [high_id]
        await workers.stop()
    finally:
        spawn.stop_all()
        await engine.dispose()


def _orphan(queue: str, priority: int, partition: int | None) -> NewJob:
    """A queued job whose XADD never happened, on the given partition (of 2) if any."""
    row = dataclasses.replace(orphan_row(queue, uuid.uuid4().hex), priority=priority)
    while partition is not None and partition_for(row.id, 2) != partition:
        row = dataclasses.replace(row, id=uuid.uuid4())
    return row


async def _keep_busy(settings: Settings, queue: str) -> None:
    """Give the only worker (concurrency 1) a long nap, so it reads nothing meanwhile."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as http:
            nap = {"type": "test.nap", "queue": queue, "payload": {"seconds": 60.0}}
            response = await http.post("/v1/jobs", json=nap)
            assert response.status_code == 202
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        for _ in range(200):
            if await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'running'", queue
            ):
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError("the nap never started")
