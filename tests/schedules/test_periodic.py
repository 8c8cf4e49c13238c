"""Schedules end to end: real API (in-process), real worker processes, Postgres and Redis."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from app.settings import Settings
from tests.conftest import wait_until
from tests.support.processes import Proc, Spawner

DECLARED = "test.periodic"  # declared in tests/support/periodic.py (not imported here: the
# registry of this process, which the in-process API uses, stays without it)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    dsn = make_url(settings.database_url).set(drivername="postgresql")
    conn = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        yield conn
    finally:
        await conn.close()


async def jobs_of(db: asyncpg.Connection, name: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT id, status, scheduled_for FROM jobs WHERE schedule = $1 ORDER BY scheduled_for",
        name,
    )
    return rows


async def create(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/schedules", json=fields)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_three_workers_make_each_slot_once_while_one_is_killed(
    client: httpx.AsyncClient, spawn: Spawner, db: asyncpg.Connection, queue: str
) -> None:
    """@every 1s for about 10 s over 3 worker processes; one is SIGKILLed, then replaced.

    The two survivors keep making the slots, so the slots form one unbroken run: none twice,
    none missing, every job run.
    """
    workers = [spawn.worker([queue], concurrency=4) for _ in range(3)]
    name = f"tick-{uuid.uuid4().hex[:8]}"
    await create(
        client, name=name, cron="@every 1s", type="demo.echo", queue=queue, missed="run_once"
    )
    await wait_until(lambda: jobs_of(db, name), timeout=30)
    await asyncio.sleep(3)
    workers[0].signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(3)
    spawn.worker([queue], concurrency=4)
    await asyncio.sleep(4.5)
    assert (await client.post(f"/v1/schedules/{name}/pause")).status_code == 200
    assert time.monotonic() - killed_at > 7

    async def all_ran() -> list[asyncpg.Record] | None:
        rows = await jobs_of(db, name)
        return rows if all(r["status"] == "succeeded" for r in rows) else None

    rows = await wait_until(all_ran, timeout=30)
    slots = [r["scheduled_for"] for r in rows]
    assert len(slots) >= 9, slots
    assert len(set(slots)) == len(slots)
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))], slots
    assert all(s.microsecond == 0 for s in slots)
    events = await db.fetchval(
        "SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id"
        " WHERE j.schedule = $1 AND e.event = 'submitted'",
        name,
    )
    assert events == len(slots)
    makers = [w for w in workers[1:] if f"job made for schedule {name}" in w.output()]
    assert makers, "the surviving workers made no slot"


async def test_pause_stops_slots_and_resume_goes_on_from_now(
    client: httpx.AsyncClient, spawn: Spawner, db: asyncpg.Connection, queue: str
) -> None:
    spawn.worker([queue], concurrency=4)
    name = f"pause-{uuid.uuid4().hex[:8]}"
    await create(client, name=name, cron="@every 1s", type="demo.echo", queue=queue)
    await wait_until(lambda: _at_least(db, name, 2), timeout=30)

    paused = await client.post(f"/v1/schedules/{name}/pause")
    assert paused.status_code == 200 and paused.json()["enabled"] is False
    paused_at: datetime = await db.fetchval("SELECT now()")
    made = len(await jobs_of(db, name))
    await asyncio.sleep(2.5)
    assert len(await jobs_of(db, name)) == made  # not one slot while paused

    resumed = await client.post(f"/v1/schedules/{name}/resume")
    assert resumed.status_code == 200 and resumed.json()["enabled"] is True
    restart = datetime.fromisoformat(resumed.json()["next_run_at"])
    assert restart > paused_at + timedelta(seconds=2)  # the paused slots are not made up for
    await wait_until(lambda: _at_least(db, name, made + 2), timeout=30)
    new = [r["scheduled_for"] for r in (await jobs_of(db, name))[made:]]
    assert new == [restart + timedelta(seconds=i) for i in range(len(new))]


async def _at_least(db: asyncpg.Connection, name: str, n: int) -> bool:
    return len(await jobs_of(db, name)) >= n


def _synced(proc: Proc) -> bool:
    return "schedules declared in code:" in proc.output()


async def _started(procs: list[Proc]) -> None:
    async def check() -> bool:
        assert all(p.alive() for p in procs), [p.output() for p in procs]
        return all(_synced(p) for p in procs)

    await wait_until(check, timeout=30)


async def test_declared_schedule_synced_once_across_worker_starts(
    client: httpx.AsyncClient, spawn: Spawner, db: asyncpg.Connection, queue: str
) -> None:
    settings = spawn.settings.model_copy(
        update={"handler_modules": "tests.support.handlers,tests.support.periodic"}
    )

    def worker(cron: str = "@every 1h") -> Proc:
        return spawn.worker(
            [queue], settings=settings, TEST_PERIODIC_QUEUE=queue, TEST_PERIODIC_CRON=cron
        )

    first = [worker() for _ in range(2)]  # two start at once
    await _started(first)
    rows = await db.fetch("SELECT * FROM schedules WHERE name = $1", DECLARED)
    assert len(rows) == 1
    assert (rows[0]["source"], rows[0]["cron"], rows[0]["queue"]) == ("code", "@every 1h", queue)
    # an operator pauses it over HTTP (this API process does not even load the type)
    assert (await client.post(f"/v1/schedules/{DECLARED}/pause")).status_code == 200
    before = await db.fetchrow("SELECT * FROM schedules WHERE name = $1", DECLARED)
    for proc in first:
        assert proc.stop() == 0

    second = [worker()]
    await _started(second)
    after = await db.fetch("SELECT * FROM schedules WHERE name = $1", DECLARED)
    assert [dict(r) for r in after] == [dict(before)]  # unchanged: still paused, same row
    assert second[0].stop() == 0

    third = [worker("@every 2h")]
    await _started(third)
    changed = await db.fetchrow("SELECT * FROM schedules WHERE name = $1", DECLARED)
    assert changed["cron"] == "@every 2h"  # the code changed: the code wins
    assert changed["enabled"] is False  # but a pause is never undone by a sync
    assert await db.fetchval("SELECT count(*) FROM schedules WHERE name = $1", DECLARED) == 1
