"""Every Conveyor connection ends a transaction left idle for longer than the lease (never less
than a floor), so a frozen process cannot hold row locks that others wait on forever."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from sqlalchemy import text

from app.db.engine import create_engine
from app.db.pool import WORKER, create_pool
from app.db.url import IDLE_IN_TRANSACTION_FLOOR_SECONDS, asyncpg_dsn, server_settings
from app.settings import Settings


def test_the_idle_in_transaction_timeout_is_the_lease_but_never_below_the_floor(
    settings: Settings,
) -> None:
    short = settings.model_copy(update={"claim_idle_seconds": 1.0})
    long = settings.model_copy(update={"claim_idle_seconds": 42.5})
    floor_ms = str(int(IDLE_IN_TRANSACTION_FLOOR_SECONDS * 1000))
    assert server_settings(short, "x")["idle_in_transaction_session_timeout"] == floor_ms
    assert server_settings(long, "x")["idle_in_transaction_session_timeout"] == "42500"
    assert server_settings(long, "conveyor-worker")["application_name"] == "conveyor-worker"


async def test_pool_and_engine_connections_carry_the_timeout(settings: Settings) -> None:
    expected = f"{int(max(settings.claim_idle_seconds, IDLE_IN_TRANSACTION_FLOOR_SECONDS))}s"
    pool = await create_pool(settings, max_size=1, application_name=WORKER)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == expected
    finally:
        await pool.close()
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            shown = await conn.scalar(text("SHOW idle_in_transaction_session_timeout"))
            assert shown == expected
    finally:
        await engine.dispose()


@pytest.mark.timeout(60)
async def test_a_lock_held_by_a_frozen_transaction_is_released(settings: Settings) -> None:
    """A pool connection that stops talking inside a transaction (as a SIGSTOPped process
    would) loses its session and its row lock after the timeout; another session then gets it."""
    dsn = asyncpg_dsn(settings.database_url)
    setup = await asyncpg.connect(dsn)
    table = f"lock_probe_{time.monotonic_ns()}"
    await setup.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    await setup.execute(f"INSERT INTO {table} VALUES (1)")
    pool = await create_pool(settings, max_size=1, application_name=WORKER)
    try:
        frozen = await pool.acquire()
        frozen_pid = frozen.get_server_pid()
        tx = frozen.transaction()
        await tx.start()
        await frozen.execute(f"SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE")
        started = time.monotonic()
        other = await asyncpg.connect(dsn)
        try:
            await asyncio.wait_for(
                other.execute(f"SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE"), timeout=40
            )
        finally:
            await other.close()
        waited = time.monotonic() - started
        limit = max(settings.claim_idle_seconds, IDLE_IN_TRANSACTION_FLOOR_SECONDS)
        assert limit - 1 < waited < limit + 20
        gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"
        assert await setup.fetchval(gone, frozen_pid) == 0  # Postgres ended that session
    finally:
        pool.terminate()
        await setup.execute(f"DROP TABLE {table}")
        await setup.close()
