"""Priorities: three bands per queue (high > 0, default 0, low < 0), read highest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from tests.conftest import wait_for_status, wait_until
from tests.support.processes import Spawner


async def submit_batch(client: httpx.AsyncClient, items: list[dict[str, Any]]) -> list[str]:
    response = await client.post("/v1/jobs/batch", json={"jobs": items})
    assert response.status_code == 202
    return [j["id"] for j in response.json()["jobs"]]


async def start_order(client: httpx.AsyncClient, ids: list[str]) -> list[str]:
    """The ids sorted by when they started, after all of them have finished."""
    started: dict[str, datetime] = {}
    for job_id in ids:
        job = await wait_for_status(client, job_id, {"succeeded", "dead"}, timeout=120)
        assert job["status"] == "succeeded"
        started[job_id] = datetime.fromisoformat(job["started_at"])
    return sorted(ids, key=lambda i: started[i])


async def test_backlog_is_served_high_then_default_then_low_fifo_within_a_band(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    def job(priority: int, n: int) -> dict[str, Any]:
        return {"type": "demo.echo", "queue": queue, "priority": priority, "payload": {"n": n}}

    low = await submit_batch(client, [job(-5, i) for i in range(25)])
    default = await submit_batch(client, [job(0, i) for i in range(25)])
    high = [
        (await client.post("/v1/jobs", json=job(p, i))).json()["id"]
        for i, p in enumerate([1, 1000, 7, 1, 50])
    ]
    spawn.worker([queue], concurrency=1)
    order = await start_order(client, low + default + high)
    assert order == high + default + low


async def test_a_flood_of_low_jobs_does_not_starve_a_high_one(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    flood = [
        {"type": "demo.sleep", "queue": queue, "priority": -1, "payload": {"seconds": 0.05}}
        for _ in range(300)
    ]
    low = await submit_batch(client, flood)
    spawn.worker([queue], concurrency=2)

    async def low_started() -> bool:
        page = (await client.get("/v1/jobs", params={"queue": queue, "status": "succeeded"})).json()
        return len(page["items"]) >= 5

    await wait_until(low_started, timeout=60)
    urgent = (
        await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue, "priority": 1})
    ).json()
    done = await wait_for_status(client, urgent["id"], {"succeeded"}, timeout=60)
    started = datetime.fromisoformat(done["started_at"])
    queues = (await client.get("/v1/queues")).json()["items"]
    waiting = next(q for q in queues if q["queue"] == queue)["waiting"]
    assert waiting > 100, "the high job had to wait for the low flood"
    later_lows = 0
    for job_id in low[-50:]:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["started_at"] is None or datetime.fromisoformat(job["started_at"]) > started:
            later_lows += 1
    assert later_lows == 50


async def test_openapi_documents_the_band_mapping(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    description = schemas["JobCreate.demo.echo"]["properties"]["priority"]["description"]
    assert "> 0 is high" in description and "< 0 low" in description
    assert "first in first out" in description
