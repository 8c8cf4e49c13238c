"""Pause/resume and limits, end to end: three real worker processes, sampled from Postgres.

The in-process API and the workers load ``tests.support.limited_handlers`` (types with limits
declared in code) on top of the usual test types.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from app.db.url import asyncpg_dsn as dsn
from app.settings import Settings
from tests.conftest import Backends, make_settings, submit, wait_until
from tests.support.processes import Spawner

HANDLERS = "tests.support.handlers,tests.support.limited_handlers"
WORKERS = 3


@pytest.fixture
def settings(backends: Backends) -> Settings:
    return make_settings(backends, handler_modules=HANDLERS)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        yield conn
    finally:
        await conn.close()


async def _start_workers(client: httpx.AsyncClient, spawn: Spawner, queue: str) -> None:
    for _ in range(WORKERS):
        spawn.worker([queue], concurrency=4)

    async def all_up() -> bool:
        items = (await client.get("/v1/workers")).json()["items"]
        return sum(queue in w["queues"] for w in items) == WORKERS

    await wait_until(all_up, timeout=60)


async def _batch(client: httpx.AsyncClient, jobs: list[dict[str, Any]]) -> list[str]:
    response = await client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    return [j["id"] for j in response.json()["jobs"]]


async def _statuses(db: asyncpg.Connection, ids: Sequence[str]) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT status, count(*) FROM jobs WHERE id = ANY($1::uuid[]) GROUP BY status", ids
    )
    return {r[0]: r[1] for r in rows}


async def _all_succeeded(db: asyncpg.Connection, ids: Sequence[str], timeout: float) -> None:
    async def done() -> bool:
        return await _statuses(db, ids) == {"succeeded": len(ids)}

    await wait_until(done, timeout=timeout, interval=0.2)


async def _workers_logged_paused(spawn: Spawner, queue: str) -> None:
    """Every worker has read that ``queue`` is paused (its log lists it among the paused
    queues, which may include other tests' queues of the same database)."""
    listed = re.compile(r"paused=(?:[^ ,\"]+,)*" + re.escape(queue) + r"[ ,\"]")

    async def seen() -> bool:
        return all(listed.search(p.output()) for p in spawn.procs)

    await wait_until(seen, timeout=90)


async def _peak_running(
    db: asyncpg.Connection, ids: Sequence[str], until_done: Sequence[str], timeout: float
) -> int:
    """Sample every 50 ms how many of ``ids`` are running, until all of ``until_done`` have
    succeeded; the highest count seen."""
    peak = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running: int = await db.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'running'", ids
        )
        peak = max(peak, running)
        if await _statuses(db, until_done) == {"succeeded": len(until_done)}:
            return peak
        await asyncio.sleep(0.05)
    raise AssertionError(f"jobs not done within {timeout}s: {await _statuses(db, until_done)}")


async def test_pause_stops_starts_and_resume_restarts_them(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, db: Any
) -> None:
    await _start_workers(client, spawn, queue)
    warm = await _batch(client, [{"type": "demo.echo", "queue": queue}] * 6)
    await _all_succeeded(db, warm, timeout=90)
    # A job running when the pause lands finishes.
    running = (
        await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 2}})
    )["id"]

    async def started() -> bool:
        return bool(
            await db.fetchval(
                "SELECT started_at IS NOT NULL FROM jobs WHERE id = $1::uuid", running
            )
        )

    await wait_until(started, timeout=90)
    response = await client.post(f"/v1/queues/{queue}/pause")
    assert response.status_code == 200
    assert response.json() == {"queue": queue, "paused": True}
    paused_at: datetime = await db.fetchval("SELECT now()")
    await _workers_logged_paused(spawn, queue)
    spawn.worker([queue], concurrency=4)  # started while paused: it reads the pause at start
    await _workers_logged_paused(spawn, queue)
    # Submissions are accepted; a delayed job still becomes queued.
    held = await _batch(client, [{"type": "demo.echo", "queue": queue}] * 20)
    delayed = (await submit(client, {"type": "demo.echo", "queue": queue, "delay_seconds": 0.5}))[
        "id"
    ]

    async def delayed_queued() -> bool:
        return bool(
            await db.fetchval("SELECT status = 'queued' FROM jobs WHERE id = $1::uuid", delayed)
        )

    await wait_until(delayed_queued, timeout=90)
    await _all_succeeded(db, [running], timeout=90)
    # Watch for 3 s: no job of the queue starts after one poll interval past the pause.
    grace = timedelta(seconds=settings.promote_interval_seconds)
    watch_until = time.monotonic() + 3
    while time.monotonic() < watch_until:
        late = await db.fetchval(
            "SELECT count(*) FROM jobs WHERE queue = $1 AND started_at > $2",
            queue,
            paused_at + grace,
        )
        assert late == 0
        await asyncio.sleep(0.1)
    assert await _statuses(db, [*held, delayed]) == {"queued": 21}
    stats = {q["queue"]: q for q in (await client.get("/v1/queues")).json()["items"]}
    assert stats[queue]["paused"] is True and stats[queue]["waiting"] == 21

    response = await client.post(f"/v1/queues/{queue}/resume")
    assert response.status_code == 200
    assert response.json() == {"queue": queue, "paused": False}
    await _all_succeeded(db, [*held, delayed], timeout=60)
    attempts = await db.fetchval("SELECT max(attempts) FROM jobs WHERE id = ANY($1::uuid[])", held)
    assert attempts == 1  # the pause spent no attempt
    stats = {q["queue"]: q for q in (await client.get("/v1/queues")).json()["items"]}
    assert stats[queue]["paused"] is False


async def test_concurrency_limit_holds_across_workers_without_blocking_other_types(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, db: Any
) -> None:
    """test.limited declares concurrency=2: never more than two running across three
    workers (sampled every 50 ms), while demo.echo jobs on the same queue keep flowing."""
    await _start_workers(client, spawn, queue)
    limited = await _batch(
        client, [{"type": "test.limited", "queue": queue, "payload": {"seconds": 0.4}}] * 16
    )
    echo = await _batch(client, [{"type": "demo.echo", "queue": queue}] * 40)
    peak = await _peak_running(db, limited, until_done=echo, timeout=60)
    unfinished = await _statuses(db, limited)
    assert unfinished.get("succeeded", 0) < len(limited)  # echo finished first: no blocking
    peak = max(peak, await _peak_running(db, limited, until_done=limited, timeout=90))
    assert peak == 2
    rows = await db.fetch(
        "SELECT attempts, jsonb_array_length(errors) FROM jobs WHERE id = ANY($1::uuid[])", limited
    )
    assert {tuple(r) for r in rows} == {(1, 0)}  # held back: not an attempt, not an error
    workers = await db.fetchval(
        "SELECT count(DISTINCT worker) FROM job_events WHERE job_id = ANY($1::uuid[])"
        " AND event = 'claimed'",
        limited,
    )
    assert workers >= 2  # the limit is shared, not per process


async def test_rate_limit_holds_in_every_one_second_window(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, db: Any
) -> None:
    """test.rated declares rate=20/s with burst=5: over about ten seconds, no one-second
    window holds more than 25 starts, and the type still runs near its rate."""
    await _start_workers(client, spawn, queue)
    ids = await _batch(client, [{"type": "test.rated", "queue": queue}] * 220)
    began = time.monotonic()
    await _all_succeeded(db, ids, timeout=120)
    took = time.monotonic() - began
    starts = [
        r[0].timestamp()
        for r in await db.fetch(
            "SELECT at FROM job_events WHERE job_id = ANY($1::uuid[]) AND event = 'claimed'"
            " ORDER BY at",
            ids,
        )
    ]
    assert len(starts) == len(ids)  # one start each
    worst = max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))
    spread = starts[-1] - starts[0]
    assert worst <= 20 + 5, (worst, spread, took)
    assert spread >= (220 - 25) / 20 - 0.5, (worst, spread)  # it was held to the rate
    assert spread < 45, (worst, spread)  # and yet ran near it (about 10 s; a busy machine)


async def test_limit_changes_over_http_take_effect_without_restart(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, db: Any
) -> None:
    await _start_workers(client, spawn, queue)
    response = await client.put(f"/v1/queues/{queue}/limits", json={"concurrency": 1})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "queue": queue,
        "concurrency": 1,
        "rate": None,
        "burst": None,
        "source": "api",
    }
    await asyncio.sleep(1.0)  # let the workers' caches refresh (interval 0.1 s)
    nap = {"type": "test.nap", "queue": queue, "payload": {"seconds": 0.3}}
    first = await _batch(client, [nap] * 8)
    assert await _peak_running(db, first, until_done=first, timeout=60) == 1

    response = await client.put(f"/v1/queues/{queue}/limits", json={"concurrency": 3})
    assert response.status_code == 200 and response.json()["concurrency"] == 3
    await asyncio.sleep(1.0)
    second = await _batch(client, [nap] * 12)
    assert await _peak_running(db, second, until_done=second, timeout=60) == 3

    response = await client.delete(f"/v1/queues/{queue}/limits")
    assert response.status_code == 200 and response.json()["source"] == "none"
    await asyncio.sleep(1.0)
    third = await _batch(client, [nap] * 12)
    assert await _peak_running(db, third, until_done=third, timeout=60) > 3


async def test_a_killed_worker_does_not_keep_its_slots(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, db: Any
) -> None:
    """Both slots of test.limited (concurrency=2) held by a worker that is SIGKILLed: once
    its leases lapse and are reclaimed, another worker runs those jobs and new ones."""
    first = spawn.worker([queue], concurrency=4)
    slow = await _batch(
        client, [{"type": "test.limited", "queue": queue, "payload": {"seconds": 30}}] * 2
    )

    async def both_running() -> bool:
        return await _statuses(db, slow) == {"running": 2}

    await wait_until(both_running, timeout=60)
    first.signal(signal.SIGKILL)
    spawn.worker([queue], concurrency=4)
    quick = await _batch(
        client, [{"type": "test.limited", "queue": queue, "payload": {"seconds": 0.1}}] * 3
    )
    await _all_succeeded(db, quick, timeout=90)
    errors = await db.fetch("SELECT errors->0->>'error' FROM jobs WHERE id = ANY($1::uuid[])", slow)
    assert {r[0] for r in errors} == {"worker lost"}  # reclaimed: their slots were freed
