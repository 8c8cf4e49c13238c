"""unique_key (debounce): while a job with the key waits, a submission of the same type by
the same API key returns it (200) instead of making another; under concurrency too."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx

from app.db.url import asyncpg_dsn
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_for_status, wait_until
from tests.support.processes import Spawner


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code in (200, 202), response.text
    job: dict[str, Any] = response.json()
    return response.status_code, job


async def count_jobs(settings: Settings, key: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM jobs WHERE unique_key = $1", key)
        return n
    finally:
        await conn.close()


async def test_a_second_submission_while_the_first_waits_returns_the_first(
    client: httpx.AsyncClient, queue: str
) -> None:
    key = uuid.uuid4().hex
    body = {"type": "demo.echo", "queue": queue, "unique_key": key, "delay_seconds": 60}
    code, first = await post(client, body)
    assert code == 202 and first["unique_key"] == key and first["status"] == "scheduled"
    # Another payload, even: the key decides (a debounce), and the first job is answered.
    code, second = await post(client, {**body, "payload": {"other": True}, "delay_seconds": 1})
    assert (code, second["id"], second["payload"]) == (200, first["id"], {})
    # Another type with the same key is another job.
    code, other = await post(client, {**body, "type": "demo.sleep", "payload": {"seconds": 0}})
    assert code == 202 and other["id"] != first["id"]
    # Once the first is cancelled the key is free.
    assert (await client.post(f"/v1/jobs/{first['id']}/cancel")).status_code == 200
    code, third = await post(client, body)
    assert code == 202 and third["id"] != first["id"]


async def test_the_key_is_free_once_the_job_started(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    key = uuid.uuid4().hex
    body = {"type": "test.nap", "queue": queue, "unique_key": key, "payload": {"seconds": 60}}
    code, first = await post(client, body)
    assert code == 202
    code, again = await post(client, body)
    assert (code, again["id"]) == (200, first["id"])
    spawn.worker([queue], concurrency=2)
    await wait_for_status(client, first["id"], {"running"}, timeout=60)
    code, second = await post(client, body)  # the first runs: not waiting any more
    assert code == 202 and second["id"] != first["id"]


async def test_unique_for_seconds_bounds_how_long_the_key_holds(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = uuid.uuid4().hex
    body = {
        "type": "demo.echo",
        "queue": queue,
        "unique_key": key,
        "unique_for_seconds": 1.0,
        "delay_seconds": 60,
    }
    code, first = await post(client, body)
    assert code == 202
    seen: list[int] = []

    async def a_new_job() -> dict[str, Any] | None:
        code, job = await post(client, body)
        seen.append(code)
        return job if code == 202 else None

    second = await wait_until(a_new_job, timeout=30, interval=0.2)
    assert second["id"] != first["id"]
    assert seen[0] == 200  # within the second it was the first job
    # The first still waits for its run_at; the new one holds the key now.
    assert (await client.get(f"/v1/jobs/{first['id']}")).json()["status"] == "scheduled"
    code, third = await post(client, body)
    assert (code, third["id"]) == (200, second["id"])
    assert await count_jobs(settings, key) == 2


async def test_concurrent_submissions_make_one_job(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    """20 at once, over two API processes and this one: one job, every answer names it."""
    key = uuid.uuid4().hex
    body = {"type": "demo.echo", "queue": queue, "unique_key": key, "delay_seconds": 60}
    urls = [spawn.api()[1], spawn.api()[1]]
    async with httpx.AsyncClient(base_url=urls[0]) as a, httpx.AsyncClient(base_url=urls[1]) as b:
        clients = [a, b, client]
        answers = await asyncio.gather(*(post(clients[i % 3], body) for i in range(20)))
    ids = {job["id"] for _, job in answers}
    assert len(ids) == 1
    assert sorted(code for code, _ in answers) == [200] * 19 + [202]
    assert await count_jobs(settings, key) == 1


async def test_batches_debounce_within_and_across(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = uuid.uuid4().hex
    item = {"type": "demo.echo", "queue": queue, "unique_key": key, "delay_seconds": 60}
    plain = {"type": "demo.echo", "queue": queue, "delay_seconds": 60}
    response = await client.post("/v1/jobs/batch", json={"jobs": [item, plain, item]})
    assert response.status_code == 202, response.text
    one, other, same = response.json()["jobs"]
    assert one["id"] == same["id"] != other["id"]
    response = await client.post("/v1/jobs/batch", json={"jobs": [plain, item]})
    assert response.json()["jobs"][1]["id"] == one["id"]
    assert await count_jobs(settings, key) == 1


async def test_keys_are_scoped_to_the_api_key(backends: Backends, queue: str) -> None:
    settings = make_settings(backends, api_keys="producer:one-secret,producer:two-secret")
    app = create_app(settings)
    key = uuid.uuid4().hex
    body = {"type": "demo.echo", "queue": queue, "unique_key": key, "delay_seconds": 60}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            one = await c.post("/v1/jobs", json=body, headers={"X-API-Key": "one-secret"})
            two = await c.post("/v1/jobs", json=body, headers={"X-API-Key": "two-secret"})
            again = await c.post("/v1/jobs", json=body, headers={"X-API-Key": "two-secret"})
    assert (one.status_code, two.status_code, again.status_code) == (202, 202, 200)
    assert one.json()["id"] != two.json()["id"] == again.json()["id"]


async def test_bad_unique_fields_are_422(client: httpx.AsyncClient, queue: str) -> None:
    for extra in (
        {"unique_for_seconds": 10},  # without a key
        {"unique_key": "k", "unique_for_seconds": 0},
        {"unique_key": "k", "unique_for_seconds": "10"},
        {"unique_key": ""},
        {"unique_key": "k" * 256},
    ):
        response = await client.post("/v1/jobs", json={"type": "demo.echo", **extra})
        assert response.status_code == 422, extra
