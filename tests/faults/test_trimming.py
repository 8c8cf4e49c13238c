"""Safe trimming: a backlog larger than CONVEYOR_STREAM_MAXLEN never costs a job.

The dispatch script adds entries only while the stream holds fewer than the bound; what does
not fit stays undispatched in Postgres (``dispatched_at`` NULL) and is sent by the workers'
dispatch sweep as entries are acked and deleted. So the stream stays within the bound and no
entry, delivered or not, is ever trimmed away.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from app.main import create_app
from app.streams.keys import GROUP, Keys
from tests.conftest import Backends, make_settings
from tests.faults.checker import conclude, open_jobs
from tests.faults.harness import (
    Ledger,
    LoadGenerator,
    Supervisor,
    create_effects_table,
    effect_body,
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
