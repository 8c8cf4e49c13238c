"""GET /v1/jobs: filters, an opaque keyset cursor, newest first, and the indexes behind it."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.db.migrate import upgrade
from app.jobs.queries import Cursor, JobFilter, listing
from app.jobs.status import JobStatus
from tests.conftest import Backends, wait_for_status
from tests.support.db import scratch_database
from tests.support.processes import Spawner


async def submit_many(client: httpx.AsyncClient, items: list[dict[str, Any]]) -> list[str]:
    response = await client.post("/v1/jobs/batch", json={"jobs": items})
    assert response.status_code == 202, response.text
    return [j["id"] for j in response.json()["jobs"]]


async def all_pages(
    client: httpx.AsyncClient, params: dict[str, Any], limit: int
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/jobs", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


async def test_pages_are_newest_first_and_complete(client: httpx.AsyncClient, queue: str) -> None:
    ids: list[str] = []
    for _ in range(4):  # separate requests, so created_at differs between the groups
        ids += await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 6)
    items = await all_pages(client, {"queue": queue}, limit=5)
    assert sorted(i["id"] for i in items) == sorted(ids)
    keys = [(i["created_at"], i["id"]) for i in items]
    assert keys == sorted(keys, reverse=True)
    assert len({i["id"] for i in items}) == len(ids)


async def test_filters(client: httpx.AsyncClient, spawn: Spawner, queue: str) -> None:
    other = queue + "-b"
    echo = await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 3)
    later = await submit_many(
        client, [{"type": "demo.sleep", "queue": queue, "payload": {"seconds": 0}}] * 2
    )
    scheduled = await submit_many(
        client, [{"type": "demo.echo", "queue": queue, "delay_seconds": 3600}] * 2
    )
    elsewhere = await submit_many(client, [{"type": "demo.echo", "queue": other}] * 2)
    spawn.worker([queue], concurrency=4)
    for job_id in echo + later:
        await wait_for_status(client, job_id, {"succeeded"}, timeout=60)

    async def ids(**params: Any) -> set[str]:
        return {i["id"] for i in await all_pages(client, params, limit=2)}

    assert await ids(queue=queue) == set(echo + later + scheduled)
    assert await ids(queue=other) == set(elsewhere)
    assert await ids(queue=queue, type="demo.sleep") == set(later)
    assert await ids(queue=queue, status="scheduled") == set(scheduled)
    assert await ids(queue=queue, status="succeeded", type="demo.echo") == set(echo)
    assert await ids(queue=other, status="succeeded") == set()

    created = {
        i["id"]: i["created_at"] for i in await all_pages(client, {"queue": queue}, limit=50)
    }
    cut = created[later[0]]
    assert await ids(queue=queue, created_before=cut) == set(echo)
    assert await ids(queue=queue, created_after=cut) == set(scheduled)
    window = await ids(queue=queue, created_after=created[echo[0]], created_before=cut)
    assert window == set()


async def test_running_jobs_are_listed_in_their_place(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    """Running rows are kept out of the listing indexes (decision 0029) and merged back in:
    every page is in order, a running job appears once, between the jobs created around it,
    and the status filter finds exactly the running ones."""
    sleep = {"type": "demo.sleep", "queue": queue, "payload": {"seconds": 60}}
    older = await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 3)
    running = await submit_many(client, [sleep] * 2)
    newer = await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 3)
    spawn.worker([queue], concurrency=2)  # the two sleeps hold it: the newer jobs wait
    for job_id in older:
        await wait_for_status(client, job_id, {"succeeded"}, timeout=60)
    for job_id in running:
        await wait_for_status(client, job_id, {"running"}, timeout=60)

    for limit in (1, 2, 3, 50):
        items = await all_pages(client, {"queue": queue}, limit=limit)
        assert [i["id"] for i in items] == list(reversed(older + running + newer))
        assert [i["status"] for i in items] == ["queued"] * 3 + ["running"] * 2 + ["succeeded"] * 3
    for params, expected in (
        ({"status": "running"}, running),
        ({"status": "queued"}, newer),
        ({"status": "succeeded"}, older),
        ({"status": "running", "type": "demo.sleep"}, running),
        ({"type": "demo.sleep"}, running),
        ({"type": "demo.echo"}, older + newer),
        ({"status": "running", "type": "demo.echo"}, []),
    ):
        items = await all_pages(client, {"queue": queue, **params}, limit=1)
        assert [i["id"] for i in items] == list(reversed(expected)), params


async def test_limit_and_bad_filters_are_422(client: httpx.AsyncClient, queue: str) -> None:
    await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 3)
    ok = await client.get("/v1/jobs", params={"queue": queue, "limit": 500})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3
    assert ok.json()["next_cursor"] is None
    for bad in (
        {"limit": 501},
        {"limit": 0},
        {"limit": "ten"},
        {"status": "sleeping"},
        {"type": "bad type!"},
        {"queue": "../etc"},
        {"created_after": "yesterday"},
        {"created_after": "2030-01-01T00:00:00"},  # no zone: ambiguous
        {"created_before": "2030-13-01T00:00:00Z"},
        {"cursor": "not-a-cursor"},
        {"cursor": "x" * 201},
        {"cursor": Cursor(datetime.now(UTC), uuid.uuid4()).encode()[:-3] + "!!!"},
    ):
        response = await client.get("/v1/jobs", params={"queue": queue, **bad})
        assert response.status_code == 422, bad
        assert response.json()["error"] == "invalid"


async def test_cursor_is_opaque_and_stable(client: httpx.AsyncClient, queue: str) -> None:
    await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 5)
    first = (await client.get("/v1/jobs", params={"queue": queue, "limit": 2})).json()
    cursor = first["next_cursor"]
    assert cursor and "|" not in cursor and ":" not in cursor
    again = (
        await client.get("/v1/jobs", params={"queue": queue, "limit": 2, "cursor": cursor})
    ).json()
    twice = (
        await client.get("/v1/jobs", params={"queue": queue, "limit": 2, "cursor": cursor})
    ).json()
    assert again == twice
    assert not {i["id"] for i in first["items"]} & {i["id"] for i in again["items"]}


async def test_pagination_while_jobs_are_inserted_returns_each_old_job_once(
    client: httpx.AsyncClient, queue: str
) -> None:
    old: list[str] = []
    for _ in range(5):
        old += await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 40)
    inserted: list[str] = []
    stop = asyncio.Event()

    async def insert_meanwhile() -> None:
        while not stop.is_set():
            inserted.extend(await submit_many(client, [{"type": "demo.echo", "queue": queue}] * 3))
            await asyncio.sleep(0)

    writer = asyncio.create_task(insert_meanwhile())
    try:
        await asyncio.sleep(0.1)
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"queue": queue, "limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get("/v1/jobs", params=params)).json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["next_cursor"]
            await asyncio.sleep(0.01)  # let the writer insert between pages
            if cursor is None:
                break
    finally:
        stop.set()
        await writer
    assert len(inserted) > 0, "nothing was inserted while paginating"
    assert len(seen) == len(set(seen)), "a job was returned twice"
    assert set(old) <= set(seen), "a pre-existing job was skipped"


# -- the plans ---------------------------------------------------------------------------------

EXPLAIN_ROWS = 60_000
FILTERS = ("status", "type", "queue", "created_after", "created_before", "owner")

_GENERATE = """
INSERT INTO jobs (id, type, queue, status, payload, attempts, owner, created_at, run_at,
                  finished_at)
SELECT gen_random_uuid(), 'type.' || (g / 3 % 20), 'queue-' || (g / 7 % 10), s.status,
       '{}'::jsonb, 1, CASE WHEN g % 5 = 0 THEN NULL ELSE 'producer:' || (g / 11 % 4) END,
       now() - make_interval(secs => g * 20), now() - make_interval(secs => g * 20),
       CASE WHEN s.status IN ('succeeded', 'dead', 'cancelled')
            THEN now() - make_interval(secs => g * 20 - 1) END
FROM generate_series(1, :n) AS g
CROSS JOIN LATERAL (SELECT CASE
    WHEN g % 100 < 80 THEN 'succeeded' WHEN g % 100 < 85 THEN 'dead'
    WHEN g % 100 < 90 THEN 'queued' WHEN g % 100 < 93 THEN 'cancelled'
    WHEN g % 100 < 96 THEN 'scheduled' WHEN g % 100 < 98 THEN 'retrying'
    ELSE 'running' END AS status) AS s
"""


@pytest.fixture(scope="module")
def explain_db(backends: Backends) -> Iterator[str]:
    """A database of its own, migrated and filled with jobs, so the planner sees a real table."""
    with scratch_database(backends.database_url, "conveyor_explain") as url:
        upgrade(url)

        async def fill() -> None:
            engine = create_async_engine(url)
            try:
                async with engine.begin() as conn:
                    await conn.execute(text(_GENERATE), {"n": EXPLAIN_ROWS})
                async with engine.connect() as conn:
                    await conn.execute(text("COMMIT"))
                    await conn.execute(text("VACUUM ANALYZE jobs"))
            finally:
                await engine.dispose()

        asyncio.run(fill())
        yield url


@pytest.fixture
async def explain_engine(explain_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(explain_db)
    try:
        yield engine
    finally:
        await engine.dispose()


def _filter(names: tuple[str, ...]) -> JobFilter:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "status": JobStatus.QUEUED,
        "type": "type.3",
        "queue": "queue-4",
        "created_after": now - timedelta(days=10),
        "created_before": now - timedelta(days=2),
        "owner": "producer:rare",  # a key with no jobs: the worst case for a filter
    }
    return JobFilter(**{n: values[n] for n in names})


def listing_sql(engine: AsyncEngine, f: JobFilter, cursor: Cursor | None) -> str:
    stmt = listing(f, 50, cursor)
    return str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))


async def plan(engine: AsyncEngine, sql: str) -> str:
    async with engine.connect() as conn:
        rows = await conn.execute(text("EXPLAIN " + sql))
        return "\n".join(r[0] for r in rows)


def _sorts_beyond_running(text_plan: str) -> list[str]:
    """The Sort nodes of a plan that may sort more than a page: a Sort is bounded when every
    scan below it reads the running rows (from ix_jobs_lease: few, one per attempt in progress)
    or sits under a Limit of its own (the merge of the listing's limited branches)."""

    def depth(line: str) -> int:
        return len(line) - len(line.lstrip(" ->"))

    lines = [line for line in text_plan.splitlines() if line.strip()]
    bad = []
    for i, line in enumerate(lines):
        node = line.lstrip(" ->")
        if node != "Sort" and not node.startswith("Sort  ("):
            continue
        below = []
        for child in lines[i + 1 :]:
            if depth(child) <= depth(line):
                break
            below.append(child)
        for k, scan in enumerate(below):
            if "Scan" not in scan or "Bitmap Heap Scan" in scan or "ix_jobs_lease" in scan:
                continue
            limited, level = False, depth(scan)
            for above in reversed(below[:k]):
                if depth(above) < level and not above.strip().startswith(("Sort Key", "Filter")):
                    level = depth(above)
                    limited = limited or above.lstrip(" ->").startswith("Limit")
            if not limited:
                bad.append(line)
                break
    return bad


def test_a_sort_of_more_than_the_running_rows_is_caught() -> None:
    """The plan check above, on a plan of each kind."""
    merge = """Limit
  ->  Merge Append
        Sort Key: jobs.created_at DESC, jobs.id DESC
        ->  Limit
              ->  Index Only Scan using ix_jobs_created on jobs
        ->  Limit
              ->  Sort
                    Sort Key: jobs_1.created_at DESC, jobs_1.id DESC
                    ->  Bitmap Heap Scan on jobs jobs_1
                          ->  Bitmap Index Scan on ix_jobs_lease"""
    assert _sorts_beyond_running(merge) == []
    everything = """Limit
  ->  Sort
        Sort Key: jobs.created_at DESC, jobs.id DESC
        ->  Append
              ->  Seq Scan on jobs
              ->  Bitmap Heap Scan on jobs jobs_1
                    ->  Bitmap Index Scan on ix_jobs_lease"""
    assert _sorts_beyond_running(everything) != []
    limited = """Limit
  ->  Sort
        Sort Key: jobs.created_at DESC, jobs.id DESC
        ->  Append
              ->  Limit
                    ->  Index Scan using ix_jobs_owner_created on jobs
              ->  Limit
                    ->  Sort
                          Sort Key: jobs_1.created_at DESC, jobs_1.id DESC
                          ->  Bitmap Heap Scan on jobs jobs_1
                                ->  Bitmap Index Scan on ix_jobs_lease"""
    assert _sorts_beyond_running(limited) == []


COMBINATIONS = [c for n in range(len(FILTERS) + 1) for c in itertools.combinations(FILTERS, n)]


async def test_every_filter_combination_uses_an_index(explain_engine: AsyncEngine) -> None:
    deep = Cursor(datetime.now(UTC) - timedelta(days=6), uuid.UUID(int=2**128 - 1))
    failures: list[str] = []
    for names in COMBINATIONS:
        for cursor in (None, deep):
            text_plan = await plan(
                explain_engine, listing_sql(explain_engine, _filter(names), cursor)
            )
            if "Seq Scan" in text_plan or "Index" not in text_plan:
                failures.append(f"{names} cursor={cursor is not None}:\n{text_plan}")
    assert not failures, "\n\n".join(failures)


async def test_single_filters_read_in_index_order_without_sorting(
    explain_engine: AsyncEngine,
) -> None:
    """No Sort node but over the running rows: a page reads `limit` index entries, at any
    depth. The same for a queue's jobs in one open status (the dashboard's "queued in q"), via
    ix_jobs_open_created."""
    deep = Cursor(datetime.now(UTC) - timedelta(days=6), uuid.UUID(int=2**128 - 1))
    for names in [(), *[(n,) for n in FILTERS], ("status", "queue")]:
        for cursor in (None, deep):
            text_plan = await plan(
                explain_engine, listing_sql(explain_engine, _filter(names), cursor)
            )
            assert not _sorts_beyond_running(text_plan), f"{names}:\n{text_plan}"
            assert "Index Scan" in text_plan, f"{names}:\n{text_plan}"
            if names == ("status", "queue"):
                assert "Index Scan using ix_jobs_open_created " in text_plan, text_plan
