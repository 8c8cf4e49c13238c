"""Conveyor behind a real PgBouncer in transaction pooling mode (ADR 0020): with
``CONVEYOR_DB_POOLER=transaction`` the API and the workers send no session settings and keep no
prepared statement past its transaction, and the whole lifecycle and a load run through it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from app.db.engine import create_engine
from app.db.pool import WORKER, create_pool, warn_of_missing_timeouts
from app.db.url import asyncpg_dsn, pooled_session_sql, server_settings, session_timeouts
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_until
from tests.support import db
from tests.support.pgbouncer import PgBouncer, pgbouncer_binary, psql_binary
from tests.support.processes import Spawner

pytestmark = pytest.mark.skipif(
    pgbouncer_binary() is None or psql_binary() is None,
    reason="pgbouncer (and psql) not installed: `apt-get install -y pgbouncer` (.ci/run does)",
)


@pytest.fixture(scope="module")
def bouncer(backends: Backends) -> Iterator[PgBouncer]:
    b = PgBouncer(backends.database_url)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def settings(backends: Backends, bouncer: PgBouncer) -> Settings:
    return make_settings(backends, database_url=bouncer.url(), db_pooler="transaction")


def _transactions(bouncer: PgBouncer, database: str) -> int:
    """Transactions PgBouncer has passed on to ``database`` so far."""
    rows = [r for r in bouncer.show("STATS") if r["database"] == database]
    return sum(int(r["total_xact_count"]) for r in rows)


@pytest.fixture
async def api(spawn: Spawner) -> AsyncIterator[httpx.AsyncClient]:
    _, url = spawn.api()
    async with httpx.AsyncClient(base_url=url, headers=CLIENT_HEADERS, timeout=30) as c:
        yield c


async def _submit(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def _until(api: httpx.AsyncClient, job_id: str, status: str, timeout: float = 60) -> Any:
    async def check() -> dict[str, Any] | None:
        job: dict[str, Any] = (await api.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in {"succeeded", "dead", "cancelled"} and job["status"] != status:
            raise AssertionError(f"wanted {status}: {job}")
        return job if job["status"] == status else None

    return await wait_until(check, timeout, interval=0.1)


def test_only_the_name_is_sent_and_the_cache_is_off_behind_the_pooler(
    settings: Settings,
) -> None:
    assert server_settings(settings, WORKER) == {"application_name": WORKER}
    assert not settings.db_statement_cache_enabled
    direct = settings.model_copy(update={"db_pooler": "none"})
    assert direct.db_statement_cache_enabled
    assert set(server_settings(direct, WORKER)) > {"application_name", "statement_timeout"}
    fast = settings.model_copy(update={"db_statement_cache": True})  # PgBouncer >= 1.21
    assert fast.db_statement_cache_enabled
    assert pooled_session_sql(settings, "conveyor") == [
        'ALTER ROLE "conveyor" SET idle_in_transaction_session_timeout = 5000',
        'ALTER ROLE "conveyor" SET statement_timeout = 15000',
    ]


async def test_the_default_settings_are_refused_and_the_pooled_ones_pass(
    settings: Settings, bouncer: PgBouncer
) -> None:
    """This PgBouncer is as strict as a real one: it refuses the session settings Conveyor
    sends by default, and asyncpg's default statement cache breaks through it (a statement
    prepared on one server connection is executed on another). Conveyor's pooled pool and
    engine, many clients taking turns on two server connections, never fail."""
    dsn = asyncpg_dsn(bouncer.url("narrow"))
    direct = settings.model_copy(update={"db_pooler": "none"})
    with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter"):
        await asyncpg.connect(dsn, server_settings=server_settings(direct, WORKER))

    async def cached(k: int) -> int:
        conn = await asyncpg.connect(dsn)  # asyncpg's defaults: a statement cache
        failed = 0
        try:
            for i in range(100):
                try:
                    await conn.fetchval("SELECT $1::int + $2::int", i, k)
                except asyncpg.InvalidSQLStatementNameError:
                    failed += 1
        finally:
            await conn.close()
        return failed

    assert sum(await asyncio.gather(*(cached(k) for k in range(8)))) > 0

    narrow = settings.model_copy(update={"database_url": bouncer.url("narrow")})
    pool = await create_pool(narrow, max_size=8, application_name=WORKER)
    engine = create_engine(narrow)
    try:

        async def through_pool(k: int) -> list[int]:
            got = []
            for i in range(50):
                async with pool.acquire() as conn:  # no transaction: one per statement
                    got.append(await conn.fetchval("SELECT $1::int + $2::int", i, k))
            return got

        async def through_engine(k: int) -> list[int]:
            got = []
            for i in range(50):
                async with engine.begin() as conn:
                    value = await conn.scalar(
                        text("SELECT CAST(:i AS int) + CAST(:k AS int)"), {"i": i, "k": k}
                    )
                    got.append(int(value))
            return got

        results = await asyncio.gather(
            *(through_pool(k) for k in range(8)), *(through_engine(k) for k in range(8))
        )
        assert results == [[i + k for i in range(50)] for k in range(8)] * 2
        servers = [r for r in bouncer.show("SERVERS") if r["database"] == "narrow"]
        assert 1 <= len(servers) <= 2, servers
    finally:
        await pool.close()
        await engine.dispose()


async def test_a_warning_names_the_timeouts_the_role_lacks(
    backends: Backends, settings: Settings, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind the pooler the timeouts cannot be sent: the pool says which the server's defaults
    lack and what to run, and is quiet once they are set (here on the database)."""
    database = str(bouncer.upstream.database)
    narrow = settings.model_copy(update={"database_url": bouncer.url("narrow")})
    bouncer.admin("RECONNECT narrow")  # server connections opened from now on
    with caplog.at_level(logging.WARNING, logger="app.db.pool"):
        pool = await create_pool(narrow, max_size=1, application_name=WORKER)
    try:
        assert await warn_of_missing_timeouts(pool, narrow) == [
            "idle_in_transaction_session_timeout",
            "statement_timeout",
        ]
        assert "ALTER ROLE" in caplog.text and "idle_in_transaction_session_timeout" in caplog.text
        timeouts = session_timeouts(narrow)
        for name, value in timeouts.items():
            await db.execute(
                backends.database_url, f'ALTER DATABASE "{database}" SET {name} = {value}'
            )
        try:
            bouncer.admin("RECONNECT narrow")
            await pool.expire_connections()
            assert await warn_of_missing_timeouts(pool, narrow) == []
        finally:
            for name in timeouts:
                await db.execute(backends.database_url, f'ALTER DATABASE "{database}" RESET {name}')
    finally:
        await pool.close()
        bouncer.admin("RECONNECT narrow")


@pytest.mark.timeout(180)
async def test_the_lifecycle_through_pgbouncer(
    settings: Settings, bouncer: PgBouncer, spawn: Spawner, api: httpx.AsyncClient, queue: str
) -> None:
    """Submit and run, a retry that then succeeds, a dead job, and its replay, with the API
    and the worker talking to Postgres only through PgBouncer."""
    database = str(bouncer.upstream.database)
    before = _transactions(bouncer, database)
    spawn.worker([queue], concurrency=4)
    echo = await _submit(api, {"type": "demo.echo", "queue": queue, "payload": {"n": 1}})
    flaky = await _submit(
        api,
        {"type": "demo.fail", "queue": queue, "max_attempts": 3, "payload": {"fail_times": 1}},
    )
    done = await _until(api, echo["id"], "succeeded")
    assert done["result"] == {"n": 1}
    # The worker is running now: this one fails its only attempt (dead), and succeeds when
    # replayed after `until`.
    until = (datetime.now(UTC) + timedelta(seconds=8)).isoformat()
    doomed = await _submit(
        api,
        {"type": "demo.fail", "queue": queue, "max_attempts": 1, "payload": {"fail_until": until}},
    )
    done = await _until(api, flaky["id"], "succeeded")
    assert done["attempts"] == 2 and len(done["errors"]) == 1
    dead = await _until(api, doomed["id"], "dead")
    assert dead["attempts"] == 1 and len(dead["errors"]) == 1
    assert doomed["id"] in [j["id"] for j in (await api.get("/v1/dlq")).json()["items"]]

    while datetime.now(UTC) < datetime.fromisoformat(until):  # its handler succeeds after that
        await asyncio.sleep(0.2)
    replayed = await api.post(f"/v1/dlq/{doomed['id']}/replay")
    assert replayed.status_code == 202, replayed.text
    done = await _until(api, doomed["id"], "succeeded")
    assert done["attempts"] == 1 and len(done["errors"]) == 1
    events = [e["event"] for e in (await api.get(f"/v1/jobs/{doomed['id']}/events")).json()]
    assert "replayed" in events, events
    assert _transactions(bouncer, database) - before > 20  # it all went through PgBouncer


@pytest.mark.timeout(300)
async def test_a_load_through_pgbouncer(
    backends: Backends, spawn: Spawner, api: httpx.AsyncClient, queue: str
) -> None:
    """300 jobs (single submissions, 20 at a time, and a batch) through one API and two
    worker processes behind PgBouncer: each ends succeeded, in one attempt."""
    spawn.worker([queue], concurrency=16)
    spawn.worker([queue], concurrency=16)
    started = time.monotonic()
    gate = asyncio.Semaphore(20)

    async def one(i: int) -> str:
        async with gate:
            job = await _submit(api, {"type": "demo.echo", "queue": queue, "payload": {"i": i}})
            return str(job["id"])

    ids = set(await asyncio.gather(*(one(i) for i in range(200))))
    batch = [{"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(200, 300)]
    response = await api.post("/v1/jobs/batch", json={"jobs": batch})
    assert response.status_code == 202, response.text
    ids |= {str(j["id"]) for j in response.json()["jobs"]}
    assert len(ids) == 300

    count_sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'succeeded'"

    async def all_done() -> bool:
        return int(await db.fetchval(backends.database_url, count_sql, queue)) == 300

    await wait_until(all_done, timeout=240, interval=0.5)
    elapsed = time.monotonic() - started
    rows = await db.fetch(  # the ledger, read on Postgres itself
        backends.database_url,
        "SELECT id::text, status, attempts, result FROM jobs WHERE queue = $1",
        queue,
    )
    assert {r["id"] for r in rows} == ids
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in rows)
    print(f"300 jobs through PgBouncer (transaction pooling) in {elapsed:.1f}s")
