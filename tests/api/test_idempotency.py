"""Idempotency keys: one job per (API key, idempotency key), decided by the unique index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_for_status
from tests.support.processes import Spawner


async def rows_with_key(settings: Settings, key: str) -> int:
    """How many job rows hold this idempotency key, counted in Postgres."""
    engine = create_async_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            n = await conn.scalar(
                text("SELECT count(*) FROM jobs WHERE idempotency_key = :k"), {"k": key}
            )
    finally:
        await engine.dispose()
    return int(n or 0)


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            yield c


def echo(queue: str, **fields: Any) -> dict[str, Any]:
    return {"type": "demo.echo", "queue": queue, "payload": {"n": 1}, **fields}


def unique_key(queue: str, name: str = "k") -> str:
    return f"{queue}-{name}"


async def test_header_repeat_returns_the_original_job_with_200(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = unique_key(queue)
    first = await client.post("/v1/jobs", json=echo(queue), headers={"Idempotency-Key": key})
    again = await client.post("/v1/jobs", json=echo(queue), headers={"Idempotency-Key": key})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["idempotency_key"] == key
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert await rows_with_key(settings, key) == 1


async def test_field_and_header_are_the_same_key(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = unique_key(queue)
    first = await client.post("/v1/jobs", json=echo(queue, idempotency_key=key))
    by_header = await client.post("/v1/jobs", json=echo(queue), headers={"Idempotency-Key": key})
    both = await client.post(
        "/v1/jobs", json=echo(queue, idempotency_key=key), headers={"Idempotency-Key": key}
    )
    assert (first.status_code, by_header.status_code, both.status_code) == (202, 200, 200)
    assert first.json()["id"] == by_header.json()["id"] == both.json()["id"]
    differing = await client.post(
        "/v1/jobs", json=echo(queue, idempotency_key=key), headers={"Idempotency-Key": key + "x"}
    )
    assert differing.status_code == 422
    assert await rows_with_key(settings, key) == 1
    assert await rows_with_key(settings, key + "x") == 0


async def test_same_key_with_a_different_request_is_409(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = unique_key(queue)
    first = await client.post("/v1/jobs", json=echo(queue, idempotency_key=key))
    for changed in (
        {**echo(queue, idempotency_key=key), "payload": {"n": 2}},
        echo(queue, idempotency_key=key, priority=5),
        echo(queue + "-other", idempotency_key=key),
        echo(queue, idempotency_key=key, delay_seconds=60),
    ):
        response = await client.post("/v1/jobs", json=changed)
        assert response.status_code == 409, changed
        assert response.json()["error"] == "conflict"
        assert response.json()["details"] == {"idempotency_key": key}
    assert await rows_with_key(settings, key) == 1
    original = (await client.get(f"/v1/jobs/{first.json()['id']}")).json()
    assert original["payload"] == {"n": 1} and original["priority"] == 0


async def test_requests_that_differ_only_in_form_are_the_same(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    """Defaults spelled out, a float for an int, run_at in another zone: the same request."""
    key = unique_key(queue)
    terse = {
        "type": "demo.sleep",
        "queue": queue,
        "payload": {"seconds": 1},
        "run_at": "2031-01-01T01:00:00+01:00",
        "idempotency_key": key,
    }
    verbose = {
        **terse,
        "payload": {"seconds": 1.0},
        "priority": 0,
        "max_attempts": 3,
        "run_at": "2031-01-01T00:00:00Z",
    }
    first = await client.post("/v1/jobs", json=terse)
    again = await client.post("/v1/jobs", json=verbose)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert await rows_with_key(settings, key) == 1


async def test_fifty_concurrent_submissions_in_process_make_one_job(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = unique_key(queue)
    responses = await asyncio.gather(
        *[
            client.post("/v1/jobs", json=echo(queue), headers={"Idempotency-Key": key})
            for _ in range(50)
        ]
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [202], statuses
    assert len({r.json()["id"] for r in responses}) == 1
    assert await rows_with_key(settings, key) == 1


async def test_fifty_concurrent_submissions_to_a_real_api_process_make_one_job(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    _, url = spawn.api()
    spawn.worker([queue], concurrency=4)
    key = unique_key(queue)
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        responses = await asyncio.gather(
            *[
                http.post("/v1/jobs", json=echo(queue), headers={"Idempotency-Key": key})
                for _ in range(50)
            ]
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 49 + [202], statuses
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        job_id = ids.pop()
        done = await wait_for_status(http, job_id, {"succeeded", "dead"}, timeout=60)
        events = (await http.get(f"/v1/jobs/{job_id}/events")).json()
    assert await rows_with_key(settings, key) == 1
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert [e["event"] for e in events] == ["submitted", "claimed", "succeeded"]


async def test_keys_are_scoped_per_api_key(backends: Backends, queue: str) -> None:
    settings = make_settings(backends, api_keys="producer:alpha-secret,producer:beta-secret")
    key = unique_key(queue)
    alpha = {"Authorization": "Bearer alpha-secret", "Idempotency-Key": key}
    beta = {"X-API-Key": "beta-secret", "Idempotency-Key": key}
    async with api(settings) as c:
        a1 = await c.post("/v1/jobs", json=echo(queue), headers=alpha)
        b1 = await c.post("/v1/jobs", json=echo(queue), headers=beta)
        a2 = await c.post("/v1/jobs", json=echo(queue), headers=alpha)
        b_other = await c.post("/v1/jobs", json={**echo(queue), "payload": {"n": 9}}, headers=beta)
    assert (a1.status_code, b1.status_code, a2.status_code) == (202, 202, 200)
    assert a1.json()["id"] != b1.json()["id"]
    assert a2.json()["id"] == a1.json()["id"]
    assert b_other.status_code == 409
    assert await rows_with_key(settings, key) == 2


async def test_key_outlives_the_run_of_its_job(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    spawn.worker([queue], concurrency=2)
    key = unique_key(queue)
    first = (await client.post("/v1/jobs", json=echo(queue, idempotency_key=key))).json()
    await wait_for_status(client, first["id"], {"succeeded"}, timeout=60)
    again = await client.post("/v1/jobs", json=echo(queue, idempotency_key=key))
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["status"] == "succeeded"
    assert await rows_with_key(settings, key) == 1


async def test_repeating_a_batch_returns_the_same_jobs(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    items = [echo(queue, idempotency_key=unique_key(queue, str(i))) for i in range(5)]
    first = await client.post("/v1/jobs/batch", json={"jobs": items})
    again = await client.post("/v1/jobs/batch", json={"jobs": items})
    assert (first.status_code, again.status_code) == (202, 202)
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    for i in range(5):
        assert await rows_with_key(settings, unique_key(queue, str(i))) == 1


async def test_a_key_twice_in_one_batch(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    """Same key and request twice: one job at both positions. Different requests: 422."""
    key = unique_key(queue, "twice")
    same = [echo(queue, idempotency_key=key), echo(queue), echo(queue, idempotency_key=key)]
    response = await client.post("/v1/jobs/batch", json={"jobs": same})
    assert response.status_code == 202
    jobs = response.json()["jobs"]
    assert jobs[0]["id"] == jobs[2]["id"] != jobs[1]["id"]
    assert await rows_with_key(settings, key) == 1

    other = unique_key(queue, "clash")
    clash = [
        echo(queue, idempotency_key=other),
        echo(queue),
        {**echo(queue, idempotency_key=other), "payload": {"n": 2}},
    ]
    response = await client.post("/v1/jobs/batch", json={"jobs": clash})
    assert response.status_code == 422
    assert [d["index"] for d in response.json()["details"]] == [2]
    assert response.json()["details"][0]["details"]["first_index"] == 0
    assert await rows_with_key(settings, other) == 0


async def test_batch_with_a_key_taken_by_another_request_creates_nothing(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    key = unique_key(queue, "taken")
    await client.post("/v1/jobs", json=echo(queue, idempotency_key=key))
    fresh = unique_key(queue, "fresh")
    batch = [
        echo(queue, idempotency_key=fresh),
        {**echo(queue, idempotency_key=key), "priority": 1},
    ]
    response = await client.post("/v1/jobs/batch", json={"jobs": batch})
    assert response.status_code == 409
    assert await rows_with_key(settings, fresh) == 0
    assert await rows_with_key(settings, key) == 1
