"""Cancel: queued, scheduled and retrying jobs → cancelled, and they never run afterwards."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from redis.asyncio import Redis

from app.main import create_app
from app.settings import Settings
from app.streams.keys import GROUP, Keys
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_for_status
from tests.support.processes import Spawner


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def events(client: httpx.AsyncClient, job_id: str) -> list[str]:
    return [e["event"] for e in (await client.get(f"/v1/jobs/{job_id}/events")).json()]


async def stream_state(settings: Settings, queue: str) -> tuple[int, int]:
    """(entries left, entries pending) over the queue's band streams."""
    keys = Keys(settings.redis_prefix)
    redis = Redis.from_url(settings.redis_url)
    try:
        length = pending = 0
        for stream in keys.queue_streams(queue, settings.partitions):
            if not await redis.exists(stream):
                continue
            length += await redis.xlen(stream)
            groups = await redis.xinfo_groups(stream)
            pending += sum(g["pending"] for g in groups if g["name"] in (GROUP, GROUP.encode()))
    finally:
        await redis.aclose()
    return length, pending


async def test_cancelled_before_any_worker_never_runs(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    job = await submit(client, {"type": "demo.echo", "queue": queue})
    assert (await stream_state(settings, queue))[0] == 1  # its entry is in the stream
    response = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    # A job submitted after it, on the same band: once it has run, the worker has read the
    # cancelled job's entry too (first in, first out).
    sentinel = await submit(client, {"type": "demo.echo", "queue": queue})
    spawn.worker([queue], concurrency=1)
    await wait_for_status(client, sentinel["id"], {"succeeded"}, timeout=60)
    after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] == "cancelled"
    assert after["attempts"] == 0 and after["started_at"] is None
    assert await events(client, job["id"]) == ["submitted", "cancelled"]
    assert await stream_state(settings, queue) == (0, 0)  # the delivery was dropped and acked


async def test_cancelled_scheduled_job_never_runs(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=2)
    job = await submit(client, {"type": "demo.echo", "queue": queue, "delay_seconds": 1})
    assert job["status"] == "scheduled"
    response = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    sentinel = await submit(client, {"type": "demo.echo", "queue": queue, "delay_seconds": 1.5})
    await wait_for_status(client, sentinel["id"], {"succeeded"}, timeout=60)
    after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] == "cancelled" and after["attempts"] == 0
    assert await events(client, job["id"]) == ["scheduled", "cancelled"]


async def test_cancelled_retrying_job_is_not_retried(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    slow_retries = settings.model_copy(update={"retry_base_seconds": 4.0})
    spawn.worker([queue], concurrency=2, settings=slow_retries)
    job = await submit(
        client,
        {"type": "demo.fail", "queue": queue, "payload": {"fail_times": 1}, "max_attempts": 3},
    )
    retrying = await wait_for_status(client, job["id"], {"retrying", "succeeded"}, timeout=60)
    assert retrying["status"] == "retrying"
    response = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["next_attempt_at"] is None
    due = datetime.fromisoformat(retrying["next_attempt_at"])
    await asyncio.sleep((due - datetime.now(UTC)).total_seconds() + 1.5)  # past its backoff
    after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after["status"] == "cancelled" and after["attempts"] == 1
    assert await events(client, job["id"]) == ["submitted", "claimed", "failed", "cancelled"]


async def test_finished_jobs_cannot_be_cancelled(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=2)
    ok = await submit(client, {"type": "demo.echo", "queue": queue})
    dead = await submit(
        client, {"type": "demo.fail", "queue": queue, "max_attempts": 1, "payload": {}}
    )
    await wait_for_status(client, ok["id"], {"succeeded"}, timeout=60)
    await wait_for_status(client, dead["id"], {"dead"}, timeout=60)
    cancelled = await submit(client, {"type": "demo.echo", "queue": queue, "delay_seconds": 60})
    assert (await client.post(f"/v1/jobs/{cancelled['id']}/cancel")).status_code == 200
    for job, status in ((ok, "succeeded"), (dead, "dead"), (cancelled, "cancelled")):
        response = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 409, status
        assert response.json()["details"] == {"status": status}
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == status


async def test_unknown_or_malformed_id(client: httpx.AsyncClient) -> None:
    assert (await client.post(f"/v1/jobs/{uuid.uuid4()}/cancel")).status_code == 404
    assert (await client.post("/v1/jobs/nope/cancel")).status_code == 422


async def test_a_producer_cannot_cancel_another_producers_job(
    backends: Backends, queue: str
) -> None:
    settings = make_settings(backends, api_keys="producer:one-secret,producer:two-secret")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            one, two = {"X-API-Key": "one-secret"}, {"X-API-Key": "two-secret"}
            body = {"type": "demo.echo", "queue": queue, "delay_seconds": 60}
            job = (await c.post("/v1/jobs", json=body, headers=one)).json()
            assert (await c.post(f"/v1/jobs/{job['id']}/cancel", headers=two)).status_code == 404
            assert (await c.get(f"/v1/jobs/{job['id']}", headers=one)).json()[
                "status"
            ] == "scheduled"
            mine = await c.post(f"/v1/jobs/{job['id']}/cancel", headers=one)
            assert mine.status_code == 200
            history = (await c.get(f"/v1/jobs/{job['id']}/events", headers=one)).json()
    assert history[-1]["event"] == "cancelled"
    assert history[-1]["actor"] == history[0]["actor"] is not None
