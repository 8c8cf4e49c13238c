"""POST /v1/jobs/batch: up to 1000 jobs, all or none, one INSERT (or, for many jobs without
keys, one COPY) and one Redis pipeline."""

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
    directly (the submit path; a COPY is recorded as ``COPY <table>``)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    real_fetch = asyncpg.Connection.fetch

    async def fetch(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(query)
        return await real_fetch(self, query, *args, **kwargs)

    real_copy = asyncpg.Connection.copy_records_to_table

    async def copy(self: asyncpg.Connection, table: str, **kwargs: Any) -> Any:
        seen.append(f"COPY {table}")
        return await real_copy(self, table, **kwargs)

    event.listen(engine, "before_cursor_execute", record)
    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch)
    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", copy)
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


@pytest.mark.parametrize("keyed", [False, True], ids=["copy", "insert"])
async def test_one_write_and_one_pipeline_for_the_whole_batch(
    settings: Settings, queue: str, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """Many jobs without keys go in by one COPY into each table; with an idempotency key
    among them, by the one INSERT that resolves keys."""
    items = [echo(queue, i, priority=(i % 3) - 1) for i in range(300)]
    items += [echo(queue, 300 + i, delay_seconds=3600) for i in range(10)]
    if keyed:
        items[5]["idempotency_key"] = f"{queue}-k"
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
    copies = [s for s in statements if s.startswith("COPY ")]
    if keyed:
        assert (len(inserts), copies) == (1, []), statements
    else:
        assert (inserts, copies) == ([], ["COPY jobs", "COPY job_events"]), statements
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


JOB_FIELDS = """status, priority, payload, max_attempts, timeout_seconds, idempotency_scope,
    owner, callback_url, attempts, claim_token, errors, deferrals, unique_key, unique_until,
    run_at = created_at AS runs_now, enqueued_at = created_at AS enqueued_now,
    enqueued_at IS NULL AS unsent, dispatched_at IS NULL AS unmarked, finished_at"""


async def _rows(settings: Settings, ids: list[str]) -> list[tuple[Any, ...]]:
    """The jobs' fields that do not differ between two submissions of the same item, with
    their events, in the order of ``ids``."""
    conn = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        rows = await conn.fetch(
            f"""SELECT j.id::text, {JOB_FIELDS},
                (SELECT array_agg(row(e.event, e.attempt, e.worker, e.actor, e.at = j.created_at)
                                  ORDER BY e.id)::text
                 FROM job_events e WHERE e.job_id = j.id) AS events
            FROM jobs j WHERE j.id = ANY($1::uuid[])""",
            ids,
        )
    finally:
        await conn.close()
    by_id = {r[0]: tuple(r[1:]) for r in rows}
    return [by_id[i] for i in ids]


async def test_a_copied_batch_writes_what_the_insert_writes(settings: Settings, queue: str) -> None:
    """The same items, in a batch large enough for COPY and in a small one (the INSERT):
    the same rows, the same events, the same answers but for ids and times."""
    items = [
        echo(queue, 1),
        echo(queue, 2, priority=7, max_attempts=9, timeout_seconds=2.5),
        echo(queue, 3, delay_seconds=3600),
        echo(queue, 4, run_at="2020-01-01T00:00:00Z"),  # in the past: queued now
        echo(queue, 5, callback_url="https://hooks.example.com/done"),
    ]
    filler = [echo(queue, 100 + i) for i in range(64)]
    hooks = settings.model_copy(update={"http_allowed_hosts": "hooks.example.com"})
    async with app_client(hooks) as (client, _):
        small = await client.post("/v1/jobs/batch", json={"jobs": items})
        large = await client.post("/v1/jobs/batch", json={"jobs": items + filler})
    assert small.status_code == 202, small.text
    assert large.status_code == 202, large.text
    inserted, copied = small.json()["jobs"], large.json()["jobs"][: len(items)]

    def comparable(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k not in {"id", "created_at", "run_at"}}

    assert [comparable(j) for j in copied] == [comparable(j) for j in inserted]
    assert copied[0]["run_at"] == copied[0]["created_at"]
    assert copied[3]["run_at"] == "2020-01-01T00:00:00Z"
    assert [j["status"] for j in copied] == ["queued", "queued", "scheduled", "queued", "queued"]
    copied_rows = await _rows(settings, [j["id"] for j in copied])
    assert copied_rows == await _rows(settings, [j["id"] for j in inserted])
    assert copied_rows[0][-1] == '{"(submitted,0,,,t)"}'
    assert copied_rows[2][-1] == '{"(scheduled,0,,,t)"}'


async def test_a_refused_value_in_a_copied_batch_is_422_and_writes_nothing(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    """Postgres refuses U+0000 in the COPY as in the INSERT: the whole batch is a 422."""
    items = [echo(queue, i) for i in range(99)] + [echo(queue, 99, payload={"t": "a\u0000b"})]
    response = await client.post("/v1/jobs/batch", json={"jobs": items})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid"
    assert await rows_in_queue(settings, queue) == 0
    again = await client.post("/v1/jobs/batch", json={"jobs": items[:99]})
    assert again.status_code == 202
    assert await rows_in_queue(settings, queue) == 99
