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
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from app.devserver import EmbeddedRedis
from app.settings import Settings
from app.streams.keys import DEFAULT_BAND, Keys
from tests.conftest import Backends, wait_until
from tests.faults.checker import drain, stranded
from tests.faults.conftest import fault_settings
from tests.faults.harness import (
    Supervisor,
    create_effects_table,
    served_before,
    statuses,
    submit_marked,
)
from tests.support.processes import Spawner


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
    await wait_until(lambda: _status_is(settings, nap, "running"), timeout=10)
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


async def test_entries_lost_without_any_sign_are_sent_again(
    backends: Backends, fault_redis: EmbeddedRedis, queue: str, tmp_path: Path
) -> None:
    """The backstop: stream entries vanish while the stream, its group and the epoch marker
    stay (a failover to a replica that missed the last XADDs looks like this). Queued jobs
    whose marks are older than CONVEYOR_DISPATCH_CHECK_SECONDS and whose recorded entries are
    gone are sent again; those whose entries exist are left alone (no duplicate)."""
    settings = fault_settings(backends.database_url, fault_redis.url, dispatch_check_seconds=2.0)
    await create_effects_table(settings.database_url)
    spawn = Spawner(settings, tmp_path)
    try:
        workers = Supervisor(spawn, [queue], 1, concurrency=1)
        workers.start()
        await workers.ready(settings.database_url)
        nap = {"type": "test.nap", "queue": queue, "payload": {"seconds": 12.0}}
        [napping] = await submit_marked(settings, [nap], marked=False)
        await wait_until(lambda: _status_is(settings, napping, "running"), timeout=10)
        bodies = [{"type": "test.effect", "queue": queue, "payload": {"sleep_ms": 5}}] * 6
        ids = await submit_marked(settings, bodies)
        stream = Keys(settings.redis_prefix).stream(queue, 0, DEFAULT_BAND)
        async with Redis.from_url(settings.redis_url, decode_responses=True) as redis:
            lost = [e for e, job in await _entries(redis, stream) if job in map(str, ids[:3])]
            assert await redis.xdel(stream, *lost) == 3

            async def entries() -> Counter[str]:
                return Counter(job for _, job in await _entries(redis, stream))

            want = {str(i) for i in [napping, *ids]}
            await wait_until(lambda: _all_there(entries, want), timeout=15)
            await asyncio.sleep(2 * settings.reconcile_seconds)  # more checks: no duplicates
            assert await entries() == Counter(want)
        await workers.stop()
        resent = workers.logged(r"(\d+) queued job\(s\) of queue \S+ had lost their stream entr")
        workers = Supervisor(spawn, [queue], 1)
        workers.start()
        await drain(settings.database_url, queue, timeout=30.0)
        await workers.stop()
    finally:
        spawn.stop_all()
    assert resent == 3
    assert await statuses(settings, ids) == ["succeeded"] * 6


async def _entries(redis: Redis, stream: str) -> list[tuple[str, str]]:
    """(entry id, job id) of every entry of ``stream`` (a client with decode_responses)."""
    return [(str(e), str((f or {}).get("job"))) for e, f in await redis.xrange(stream) or []]


async def _status_is(settings: Settings, job_id: uuid.UUID, status: str) -> bool:
    return await statuses(settings, [job_id]) == [status]


async def _all_there(entries: Callable[[], Awaitable[Counter[str]]], want: set[str]) -> bool:
    return set(await entries()) == want
