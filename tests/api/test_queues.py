"""GET /v1/queues: per-queue counts from the partial index, plus the streams' pending count."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.jobs.queries import QUEUE_COUNTS
from app.settings import Settings
from tests.api import test_listing
from tests.conftest import wait_for_status, wait_until
from tests.support.processes import Spawner

# The big, analysed database of the listing tests (fixtures `explain_db`, `explain_engine`).
explain_db = test_listing.explain_db
explain_engine = test_listing.explain_engine

NO_LIMITS = {"concurrency": None, "rate": None, "burst": None, "source": "none"}


async def stats_of(client: httpx.AsyncClient, queue: str) -> dict[str, Any] | None:
    response = await client.get("/v1/queues")
    assert response.status_code == 200
    for item in response.json()["items"]:
        if item["queue"] == queue:
            found: dict[str, Any] = item
            return found
    return None


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def test_waiting_and_scheduled_before_any_worker(
    client: httpx.AsyncClient, queue: str
) -> None:
    assert await stats_of(client, queue) is None
    for _ in range(3):
        await submit(client, {"type": "demo.echo", "queue": queue})
    for _ in range(2):
        await submit(client, {"type": "demo.echo", "queue": queue, "delay_seconds": 3600})
    assert await stats_of(client, queue) == {
        "queue": queue,
        "waiting": 3,
        "running": 0,
        "scheduled": 2,
        "retrying": 0,
        "dead": 0,
        "pending": 0,
        "paused": False,
        "limits": NO_LIMITS,
    }


async def test_running_retrying_dead_and_pending(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    slow_retries = settings.model_copy(
        update={"retry_base_seconds": 60.0, "retry_max_seconds": 120.0}
    )
    spawn.worker([queue], concurrency=4, settings=slow_retries)
    sleepers = [
        await submit(client, {"type": "demo.sleep", "queue": queue, "payload": {"seconds": 30}})
        for _ in range(2)
    ]
    dead = await submit(client, {"type": "demo.fail", "queue": queue, "max_attempts": 1})
    retrying = await submit(
        client, {"type": "demo.fail", "queue": queue, "payload": {"fail_times": 5}}
    )
    for job_id in sleepers:
        await wait_for_status(client, job_id, {"running"}, timeout=60)
    await wait_for_status(client, dead, {"dead"}, timeout=60)
    await wait_for_status(client, retrying, {"retrying"}, timeout=60)

    async def settled() -> dict[str, Any] | None:
        stats = await stats_of(client, queue)
        return stats if stats and stats["pending"] == 2 else None

    stats = await wait_until(settled, timeout=30)
    assert stats == {
        "queue": queue,
        "waiting": 0,
        "running": 2,
        "scheduled": 0,
        "retrying": 1,
        "dead": 1,
        "pending": 2,  # the two sleepers' entries: delivered, not yet acknowledged
        "paused": False,
        "limits": NO_LIMITS,
    }
    for job_id in [*sleepers, retrying]:
        assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code in (200, 202, 409)


async def test_counts_come_from_the_partial_index(explain_engine: AsyncEngine) -> None:
    """On 60,000 jobs (80% finished), the counts never read the table itself."""
    async with explain_engine.connect() as conn:
        rows = await conn.execute(text("EXPLAIN " + QUEUE_COUNTS))
        plan = "\n".join(r[0] for r in rows)
    assert "Index Only Scan using ix_jobs_open on jobs" in plan, plan
    assert "Index Only Scan using ix_jobs_dlq_removed on jobs" in plan, plan
    assert "Seq Scan" not in plan, plan
