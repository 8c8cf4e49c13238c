"""A worker never runs one job twice at once, and never reclaims its own live attempt; every
attempt's statements are fenced by a claim token that nothing lowers (real processes)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import httpx

from app.db.url import asyncpg_dsn as dsn
from app.jobs import attempts, failover
from app.jobs.repository import Backoff
from app.settings import Settings
from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Spawner
from workers.context import WorkerConfig
from workers.runner import Worker

LAPSE = "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1"


async def _events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    return events


async def _running(client: httpx.AsyncClient, job_id: str) -> bool:
    return bool((await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running")


async def test_worker_does_not_reclaim_its_own_live_attempt(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """Its heartbeats do not reach Postgres for longer than the lease (here: the test keeps
    the lease lapsed) while the job runs: its own reconcile and XAUTOCLAIM leave the attempt
    alone, and the job runs once."""
    spawn.worker([queue], concurrency=4, name=f"lonely-{queue}")
    job = await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 6}})
    await wait_until(lambda: _running(client, job["id"]), timeout=30)
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        until = time.monotonic() + 5.0  # past two reconcile rounds and five XAUTOCLAIM ones
        while time.monotonic() < until:
            await conn.execute(LAPSE, UUID(job["id"]))
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert (done["status"], done["attempts"], done["errors"]) == ("succeeded", 1, [])
    assert [e["event"] for e in await _events(client, job["id"])] == [
        "submitted",
        "claimed",
        "succeeded",
    ]


async def test_job_queued_again_while_its_stale_attempt_runs_waits_for_it(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """Another worker reclaims the job while this one still runs attempt 1 (a stall); the job
    is retried and its new entry reaches this worker. It must not start attempt 2 beside its
    own attempt 1 (keyed by id, the second run would replace the first in its books); it
    takes it once attempt 1 is over."""
    worker = spawn.worker([queue], concurrency=4, name=f"stalled-{queue}")
    body = {"type": "test.nap", "queue": queue, "payload": {"seconds": 5, "until_attempt": 1}}
    job = await submit(client, body)
    job_id = UUID(job["id"])
    await wait_until(lambda: _running(client, job["id"]), timeout=30)
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        lost: list[attempts.Reclaimed] = []
        while not lost:  # the worker's heartbeat may renew the lease in between: again
            await conn.execute(LAPSE, job_id)
            lost = await attempts.reclaim_expired(
                conn, "rescuer", Backoff(0.0, 0.0), [queue], ids=[job_id]
            )
        assert lost[0].status == "retrying"
    finally:
        await conn.close()
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded"
    assert done["result"] == {"worker": worker.name, "attempt": 2}
    claims = [e for e in await _events(client, job["id"]) if e["event"] == "claimed"]
    assert [c["attempt"] for c in claims] == [1, 2]
    first, second = (datetime.fromisoformat(c["at"]) for c in claims)
    assert (second - first).total_seconds() >= 4.5  # attempt 1 napped 5 s first


async def test_a_worker_records_a_switch_of_postgres_server_before_its_first_read(
    settings: Settings, queue: str
) -> None:
    """The processes moved to another server (a promoted replica: the identity recorded is
    the old one's). A worker records the switch, raising the claim tokens' floor, while it
    gets ready, before its read loops start: its first claim cannot hand out a token that a
    claim only the old server saw had already handed out."""
    conn = await asyncpg.connect(dsn(settings.database_url))
    worker = Worker(settings, WorkerConfig([queue], concurrency=2, name=f"switch-{queue}"))
    try:
        await conn.execute(
            "INSERT INTO conveyor_state (key, value) VALUES ($1, 'old-server:1')"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            failover.IDENTITY_KEY,
        )
        floor = "SELECT CAST(value AS bigint) FROM conveyor_state WHERE key = $1"
        before = await conn.fetchval(floor, failover.CLAIM_FLOOR_KEY) or 0
        await worker._until_ready()  # what run() does before it starts the loops
        after = await conn.fetchval(floor, failover.CLAIM_FLOOR_KEY)
        assert after == before + failover.CLAIM_FLOOR_STEP
        identity = await conn.fetchval(
            "SELECT value FROM conveyor_state WHERE key = $1", failover.IDENTITY_KEY
        )
        assert identity != "old-server:1"
    finally:
        await worker.maintenance.unregister()
        await worker.ctx.stream.close()
        await worker.ctx.close_db()
        await worker._engine.dispose()
        await conn.close()
