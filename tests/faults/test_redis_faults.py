"""Redis faults: data loss (FLUSHALL, kill -9 and an empty restart), a hung or stopped Redis.

Scenario 4 of the fault-injection suite, and the Redis-down contract: while Redis is
unreachable, ``/readyz`` answers 503 and submissions still answer 202 within a bounded time
(committed to Postgres; dispatched once Redis is back).
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.devserver import EmbeddedRedis
from app.settings import Settings
from app.streams.connection import create_redis
from tests.faults.checker import conclude, stranded
from tests.faults.harness import (
    Fault,
    LoadGenerator,
    effect_body,
)
from tests.faults.scenario import start_scenario, wait_running
from tests.support.processes import Spawner

# With CONVEYOR_REDIS_TIMEOUT_SECONDS=1: a submission waits for at most one timed-out Redis
# call before it answers 202 with the dispatch deferred.
SUBMIT_BOUND_SECONDS = 3.0
OUTAGE_SECONDS = 5.0
NAPS = 10


async def test_redis_data_loss_loses_no_job(
    spawn: Spawner, settings: Settings, fault_redis: EmbeddedRedis, queue: str, results: Path
) -> None:
    """Scenario 4: FLUSHALL at 30 % of the load; at 60 %, kill -9 the redis-server and start
    it again, empty, on the same port. Each fault hits a backlog of stream entries, delayed
    jobs and jobs waiting for a retry. Workers recreate their consumer groups (from id 0),
    detect the loss and re-dispatch every queued job from Postgres; delayed and retrying jobs
    were never in Redis; no worker crashes."""
    run = await start_scenario(spawn, settings, queue, seed=4)
    rng, url, gen, ledger, workers = run.rng, run.url, run.gen, run.ledger, run.workers
    bodies = run.effects(queue, 900)
    load = run.load(bodies, 30.0)
    faults: list[Fault] = []
    await gen.reached(0.3 * len(bodies))
    await LoadGenerator(ledger, url).submit_batch(_at_stake(queue, rng))
    async with Redis.from_url(fault_redis.url) as redis:
        faults.append(Fault(time.time(), "flushall"))
        await redis.flushall()
    await asyncio.sleep(3 * settings.reconcile_seconds)
    lost_entries = await stranded(settings, queue)
    assert not lost_entries, f"jobs marked dispatched whose entries are gone: {lost_entries}"
    await gen.reached(0.6 * len(bodies))
    await LoadGenerator(ledger, url).submit_batch(_at_stake(queue, rng))
    faults.append(Fault(time.time(), "redis_kill9"))
    fault_redis.kill()
    await asyncio.sleep(2.0)
    fault_redis.start()
    await asyncio.sleep(3 * settings.reconcile_seconds)
    lost_entries = await stranded(settings, queue)
    assert not lost_entries, f"jobs marked dispatched whose entries are gone: {lost_entries}"
    await load
    report = await conclude(
        "redis_flushall_kill9",
        settings.database_url,
        queue,
        ledger,
        workers,
        results,
        faults,
        breakdown={"flushall_recovery": faults[:1], "kill9_recovery": faults[1:]},
    )
    assert report.statuses == {"succeeded": report.jobs}
    assert workers.restarts == 0, "a worker process died of a Redis fault"
    assert report.extra["http_5xx_other"] == 0
    assert workers.logged("consumer group missing") > 0, "NOGROUP was never met"
    assert workers.logged(r"re-dispatching (\d+) queued job") > 0, "no lost entry was re-sent"


def _at_stake(queue: str, rng: random.Random) -> list[dict[str, Any]]:
    """What a Redis loss must not take along: 200 entries waiting in the stream, 25 delayed
    jobs due in 2 s, 25 jobs failing (and waiting for their retry) for 2 s."""
    until = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    return (
        [effect_body(queue, rng) for _ in range(200)]
        + [effect_body(queue, rng, delay_seconds=2) for _ in range(25)]
        + [
            {"type": "demo.fail", "queue": queue, "payload": {"fail_until": until}}
            | {"max_attempts": 20}
            for _ in range(25)
        ]
    )


async def _outage(
    spawn: Spawner,
    settings: Settings,
    server: EmbeddedRedis,
    queue: str,
    results: Path,
    *,
    hang: bool,
) -> None:
    """Redis hangs (SIGSTOP) or refuses connections (stopped) for 5 s while jobs run (and
    finish) and new jobs are submitted."""
    run = await start_scenario(spawn, settings, queue, seed=5)
    url, ledger, workers = run.url, run.ledger, run.workers
    # Naps running when Redis goes: most end during the outage, two outlast it.
    nap = {"type": "test.nap", "queue": queue, "payload": {"seconds": 3.0}}
    naps = [nap] * (NAPS - 2) + [{**nap, "payload": {"seconds": 7.0}}] * 2
    await LoadGenerator(ledger, url).run(naps, 100.0)
    await wait_running(settings.database_url, queue, NAPS)
    fault = Fault(time.time(), "redis_hang" if hang else "redis_down")
    if hang:
        server.pause()
    else:
        server.stop()
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        ready = await http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is False, ready.text
    gen = LoadGenerator(ledger, url, concurrency=5, request_timeout=30.0, deadline=0.0)
    await gen.run(run.effects(queue, 20), 20.0)
    await asyncio.sleep(max(0.0, fault.at + OUTAGE_SECONDS - time.time()))
    outage = time.time() - fault.at
    if hang:
        server.resume()
    else:
        server.start()
    healed = Fault(time.time(), "redis_back", jobs=frozenset(ledger.ok()))
    report = await conclude(
        "redis_hang" if hang else "redis_down",
        settings.database_url,
        queue,
        ledger,
        workers,
        results,
        [healed],
        outage_s=f"{outage:.1f}",
        submit_max_s=f"{ledger.slowest_answer:.2f}",
    )
    assert dict(ledger.statuses) == {202: 20 + NAPS}, ledger.statuses
    assert report.statuses == {"succeeded": 20 + NAPS}
    assert ledger.slowest_answer < SUBMIT_BOUND_SECONDS
    assert workers.restarts == 0
    # Live workers lose nothing to a Redis outage: every nap ended on its first attempt (the
    # leases were kept), those that finished during it were written at once, none ran twice.
    assert {r["attempts"] for r in report.snap.jobs.values()} == {1}
    assert report.dup_exec == 0 and report.extra["fenced"] == 0


async def test_redis_hung_submissions_answer_202_in_bounded_time(
    spawn: Spawner, settings: Settings, fault_redis: EmbeddedRedis, queue: str, results: Path
) -> None:
    await _outage(spawn, settings, fault_redis, queue, results, hang=True)


async def test_redis_stopped_submissions_answer_202_and_run_later(
    spawn: Spawner, settings: Settings, fault_redis: EmbeddedRedis, queue: str, results: Path
) -> None:
    await _outage(spawn, settings, fault_redis, queue, results, hang=False)


@pytest.mark.serial  # times one socket timeout to within a second
async def test_client_survives_restart_and_waits_one_timeout_on_a_hang(
    settings: Settings, fault_redis: EmbeddedRedis
) -> None:
    """After a restart the pooled connections are dead: the next command reconnects instead of
    failing. A hung server costs one socket timeout per call (no retry), a stopped one fails
    at once."""
    client = create_redis(settings)
    try:
        assert await client.ping()
        fault_redis.kill()
        fault_redis.start()
        assert await client.ping()
        async with client.pipeline(transaction=False) as pipe:
            pipe.ping()
            assert await pipe.execute() == [True]
        fault_redis.pause()
        began = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        waited = time.monotonic() - began
        fault_redis.resume()
        assert settings.redis_timeout_seconds * 0.9 < waited < settings.redis_timeout_seconds * 1.9
        fault_redis.stop()
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await client.aclose()
