"""POST /v1/jobs/batch: up to 1000 jobs, all or none, one INSERT and one Redis pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine

from app.main import create_app
from app.settings import Settings
from app.streams.keys import Keys
from tests.conftest import CLIENT_HEADERS, wait_for_status
from tests.support.processes import Spawner


async def rows_in_queue(settings: Settings, queue: str) -> int:
    engine = create_async_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            n = await conn.scalar(text("SELECT count(*) FROM jobs WHERE queue = :q"), {"q": queue})
    finally:
        await engine.dispose()
    return int(n or 0)


def echo(queue: str, n: int, **fields: Any) -> dict[str, Any]:
    return {"type": "demo.echo", "queue": queue, "payload": {"n": n}, **fields}


@contextmanager
def counting_statements(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Observe (not alter) the SQL sent by the app: through its engine, and on asyncpg
    directly (the submit path)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    real_fetch = asyncpg.Connection.fetch

    async def fetch(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(query)
        return await real_fetch(self, query, *args, **kwargs)

    event.listen(engine, "before_cursor_execute", record)
    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            yield c, app.state.conveyor


async def test_batch_is_created_in_order_and_runs(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=4)
    response = await client.post(
        "/v1/jobs/batch", json={"jobs": [echo(queue, i) for i in range(20)]}
    )
    assert response.status_code == 202
    jobs = response.json()["jobs"]
    assert [j["payload"]["n"] for j in jobs] == list(range(20))
    assert len({j["id"] for j in jobs}) == 20
    for job in jobs:
        done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
        assert done["result"] == job["payload"]


async def test_one_insert_and_one_pipeline_for_the_whole_batch(
    settings: Settings, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [echo(queue, i, priority=(i % 3) - 1) for i in range(300)]
    items += [echo(queue, 300 + i, delay_seconds=3600) for i in range(10)]
    async with app_client(settings) as (c, state):
        pipelines: list[object] = []
        real_pipeline = state.stream.redis.pipeline

        def spy(*args: Any, **kwargs: Any) -> Any:
            pipelines.append(object())
            return real_pipeline(*args, **kwargs)

        monkeypatch.setattr(state.stream.redis, "pipeline", spy)
        with counting_statements(state.engine.sync_engine, monkeypatch) as statements:
            response = await c.post("/v1/jobs/batch", json={"jobs": items})
        monkeypatch.undo()
    assert response.status_code == 202
    inserts = [s for s in statements if "INSERT" in s.upper()]
    assert len(inserts) == 1, statements
    assert len(pipelines) == 1
    statuses = [j["status"] for j in response.json()["jobs"]]
    assert statuses == ["queued"] * 300 + ["scheduled"] * 10
    assert await rows_in_queue(settings, queue) == 310
    keys = Keys(settings.redis_prefix)
    redis = Redis.from_url(settings.redis_url)
    try:
        lengths = [await redis.xlen(keys.stream(queue, 0, band)) for band in (0, 1, 2)]
    finally:
        await redis.aclose()
    assert lengths == [100, 100, 100]  # priority 1 → b0, 0 → b1, -1 → b2; scheduled wait


async def test_one_bad_item_is_422_with_its_index_and_creates_nothing(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    items = [echo(queue, i) for i in range(10)]
    items[7] = {"type": "no.such.type", "queue": queue}
    before = await rows_in_queue(settings, queue)
    response = await client.post("/v1/jobs/batch", json={"jobs": items})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid"
    assert [d["index"] for d in body["details"]] == [7]
    assert "unknown job type" in body["details"][0]["message"]
    assert await rows_in_queue(settings, queue) == before == 0


async def test_every_bad_index_is_named_whatever_its_fault(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    items: list[Any] = [echo(queue, i) for i in range(8)]
    items[1] = echo(queue, 1, priority=5000)  # a field out of range
    items[3] = {"type": "demo.sleep", "queue": queue, "payload": {"seconds": "x"}}  # payload
    items[4] = "not an object"
    items[5] = echo(queue, 5, colour="red")  # an unknown field
    items[6] = echo(queue, 6, run_at="2030-01-01T00:00:00Z", delay_seconds=5)
    response = await client.post("/v1/jobs/batch", json={"jobs": items})
    assert response.status_code == 422
    details = response.json()["details"]
    assert [d["index"] for d in details] == [1, 3, 4, 5, 6]
    assert details[0]["details"][0]["loc"] == ["priority"]
    assert details[1]["details"][0]["loc"] == ["seconds"]
    assert details[3]["details"][0]["loc"] == ["colour"]
    assert await rows_in_queue(settings, queue) == 0


async def test_a_batch_of_one_names_index_zero(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    response = await client.post("/v1/jobs/batch", json={"jobs": [{"type": "nope"}]})
    assert response.status_code == 422
    assert [d["index"] for d in response.json()["details"]] == [0]


async def test_size_limits(client: httpx.AsyncClient, settings: Settings, queue: str) -> None:
    too_many = await client.post(
        "/v1/jobs/batch", json={"jobs": [{"type": "demo.echo", "queue": queue}] * 1001}
    )
    assert too_many.status_code == 422
    assert await rows_in_queue(settings, queue) == 0
    bad_bodies: list[dict[str, Any]] = [
        {"jobs": []},
        {},
        {"jobs": {"type": "demo.echo"}},
        {"jobs": [], "x": 1},
    ]
    for bad in bad_bodies:
        response = await client.post("/v1/jobs/batch", json=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"] == "invalid"
    full = await client.post(
        "/v1/jobs/batch", json={"jobs": [{"type": "demo.echo", "queue": queue}] * 1000}
    )
    assert full.status_code == 202
    assert len(full.json()["jobs"]) == 1000
    assert await rows_in_queue(settings, queue) == 1000


async def test_openapi_documents_batch_items_as_jobcreate(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    jobs = schemas["JobBatchCreate"]["properties"]["jobs"]
    assert jobs["items"] == {"$ref": "#/components/schemas/JobCreate"}
    assert jobs["maxItems"] == 1000


async def test_nul_characters_are_422_not_a_server_error(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    """Postgres text and jsonb cannot hold U+0000: it is refused before anything is written."""
    bad: list[dict[str, Any]] = [
        echo(queue, 0, payload={"text": "a\u0000b"}),
        echo(queue, 1, payload={"key\u0000": 1}),
        echo(queue, 2, payload={"deep": [{"x": ["\u0000"]}]}),
        echo(queue, 3, idempotency_key="k\u0000"),
    ]
    for item in bad:
        single = await client.post("/v1/jobs", json=item)
        assert single.status_code == 422, item
    response = await client.post("/v1/jobs/batch", json={"jobs": [echo(queue, 9), *bad]})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid"
    assert await rows_in_queue(settings, queue) == 0
