"""The alembic migrations on a fresh database: idempotent upgrade, full downgrade, no drift."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.migrate import alembic_config, downgrade, upgrade
from app.db.models import Base
from tests.conftest import Backends
from tests.support import db
from tests.support.db import scratch_database

TABLES = {"jobs", "job_events", "workers"}


def fetch(url: str, sql: str) -> list[Any]:
    return [tuple(r) for r in asyncio.run(db.fetch(url, sql))]


@pytest.fixture
def fresh_db(backends: Backends) -> Iterator[str]:
    """An empty database of its own on the test server, dropped afterwards."""
    with scratch_database(backends.database_url, "conveyor_mig") as url:
        yield url


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config("unused")).get_current_head()
    assert revision is not None
    return revision


def tables(url: str) -> set[str]:
    rows = fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows} - {"alembic_version"}


def schema_oids(url: str) -> set[tuple[str, int]]:
    """Every table, index and constraint with its oid: a re-created object gets a new one."""
    return set(
        fetch(
            url,
            "SELECT c.relname, c.oid::int FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
            " UNION ALL SELECT conname, oid::int FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace",
        )
    )


def version(url: str) -> list[str]:
    return [r[0] for r in fetch(url, "SELECT version_num FROM alembic_version")]


def test_upgrade_twice_is_a_no_op(fresh_db: str) -> None:
    upgrade(fresh_db)
    assert tables(fresh_db) >= TABLES
    assert version(fresh_db) == [head()]
    before = schema_oids(fresh_db)

    upgrade(fresh_db)

    assert version(fresh_db) == [head()]
    assert schema_oids(fresh_db) == before


def test_downgrade_to_base_then_upgrade_again(fresh_db: str) -> None:
    upgrade(fresh_db)
    fetch(
        fresh_db,
        "INSERT INTO workers (name, host, pid, queues, concurrency)"
        " VALUES ('w', 'h', 1, ARRAY['default'], 1) RETURNING name",
    )

    downgrade(fresh_db, "base")
    assert tables(fresh_db) == set()
    assert version(fresh_db) == []

    upgrade(fresh_db)
    assert tables(fresh_db) >= TABLES
    assert version(fresh_db) == [head()]
    assert fetch(fresh_db, "SELECT count(*) FROM workers") == [(0,)]


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, Base.metadata))


async def _autogenerate_diff(url: str) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff)
    finally:
        await engine.dispose()


def test_models_match_the_migrated_schema(fresh_db: str) -> None:
    upgrade(fresh_db)
    assert asyncio.run(_autogenerate_diff(fresh_db)) == []
