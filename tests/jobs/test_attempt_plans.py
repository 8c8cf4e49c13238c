"""The plans of the worker's statements about attempts named by id, on a table whose
statistics were taken while nothing ran: the trap of decision 0029.

Running rows are only in ix_jobs_lease. A statement that spelled its guard
``j.status = 'running'`` could start from that index (estimated at a row) and test every running
row against every id it was given: 250,000 comparisons for a batch of 500. Each statement is
run here, custom and generic plans alike, on 500 running rows, and its plan must neither read
ix_jobs_lease nor filter a join by more than a few rows per id.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from app.db.migrate import upgrade
from app.db.url import asyncpg_dsn
from app.jobs import attempts, unknown_type
from app.jobs.ids import new_job_id
from tests.conftest import Backends
from tests.support.db import scratch_database

ROWS = 20_000
BATCH = 500
WORKER = "plan-test"


@pytest.fixture(scope="module")
def plan_db(backends: Backends) -> Iterator[str]:
    with scratch_database(backends.database_url, "conveyor_plans") as url:
        upgrade(url)
        yield url


async def _queued_table(plan_db: str) -> tuple[asyncpg.Connection, list[UUID]]:
    """A connection, and 20,000 queued jobs with the statistics taken now."""
    conn = await asyncpg.connect(asyncpg_dsn(plan_db))
    await conn.execute("TRUNCATE jobs, job_events")
    ids = [new_job_id() for _ in range(ROWS)]
    await conn.execute(
        "INSERT INTO jobs (id, type, queue, status, payload, enqueued_at, dispatched_at)"
        " SELECT i, 'demo.echo', 'plans', 'queued', '{}', now(), now()"
        " FROM unnest($1::uuid[]) i",
        ids,
    )
    await conn.execute("VACUUM ANALYZE jobs")
    return conn, ids


@pytest.fixture
async def running(plan_db: str) -> AsyncIterator[tuple[asyncpg.Connection, list[attempts.Claim]]]:
    """A connection and 500 attempts running, with statistics taken before any ran."""
    conn, ids = await _queued_table(plan_db)
    try:
        claims = await attempts.claim_many(conn, ids[:BATCH], WORKER, 60)
        assert len(claims) == BATCH
        yield conn, claims
    finally:
        await conn.close()


async def _explain(conn: asyncpg.Connection, sql: str, types: str, values: list[Any]) -> str:
    """EXPLAIN ANALYZE of ``sql`` prepared with ``types`` and run with ``values``, under the
    connection's plan_cache_mode; what it wrote is rolled back."""
    literals = ", ".join(_literal(v) for v in values)
    await conn.execute(f"PREPARE s({types}) AS {sql}")
    writes = conn.transaction()
    await writes.start()
    try:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE) EXECUTE s({literals})")
    finally:
        await writes.rollback()
        await conn.execute("DEALLOCATE s")
    return "\n".join(r[0] for r in rows)


def _ids(c: Sequence[attempts.Claim]) -> list[UUID]:
    return [x.id for x in c]


def _tokens(c: Sequence[attempts.Claim]) -> list[int]:
    return [x.token for x in c]


ERROR = '{"error": "e", "type": "E", "traceback": null, "attempt": 1, "worker": "plan-test"}'
STATEMENTS: dict[str, tuple[str, str, Callable[[Sequence[attempts.Claim]], list[Any]]]] = {
    "succeed": (
        attempts._SUCCEED,
        "uuid[], bigint[], text[], text",
        lambda c: [_ids(c), _tokens(c), ["{}"] * len(c), WORKER],
    ),
    "complete": (
        attempts._COMPLETE,
        "uuid[], bigint[], text[], text[], bool[], text, float8, float8, bool[], float8[], int",
        lambda c: [
            _ids(c),
            _tokens(c),
            [None] * len(c),
            [ERROR] * len(c),
            [False] * len(c),
            WORKER,
            1.0,
            60.0,
            [False] * len(c),
            [None] * len(c),
            3,
        ],
    ),
    "heartbeat": (
        attempts._HEARTBEAT,
        "uuid[], bigint[], text, float8",
        lambda c: [_ids(c), _tokens(c), WORKER, 60.0],
    ),
    "progress": (
        attempts._PROGRESS,
        "uuid[], bigint[], text[], text",
        lambda c: [_ids(c), _tokens(c), ["{}"] * len(c), WORKER],
    ),
    "release": (
        attempts._RELEASE,
        "uuid[], bigint[], text",
        lambda c: [_ids(c), _tokens(c), WORKER],
    ),
    "unknown type": (
        unknown_type._HAND_BACK,
        "uuid[], bigint[], text[], text, float8, float8, float8, float8",
        lambda c: [_ids(c), _tokens(c), [ERROR] * len(c), WORKER, 1.0, 60.0, 3600.0, 0.0],
    ),
}


def _literal(value: Any) -> str:
    """``value`` as a SQL literal (EXECUTE takes no bound parameters); arrays as '{...}',
    which EXECUTE casts to the prepared statement's parameter types."""
    if isinstance(value, list):
        items = []
        for item in value:
            if item is None:
                items.append("NULL")
            elif isinstance(item, bool):
                items.append("t" if item else "f")
            elif isinstance(item, int | float):
                items.append(repr(item))
            else:
                text = str(item).replace("\\", "\\\\").replace('"', '\\"')
                items.append(f'"{text}"')
        value = "{" + ",".join(items) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _join_filter_removed(plan: str) -> int:
    return max((int(n) for n in re.findall(r"Rows Removed by Join Filter: (\d+)", plan)), default=0)


@pytest.mark.parametrize("name", list(STATEMENTS))
@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_batch_finds_its_rows_by_id_whatever_the_statistics_say(
    running: tuple[asyncpg.Connection, list[attempts.Claim]], name: str, mode: str
) -> None:
    conn, claims = running
    sql, types, args = STATEMENTS[name]
    await conn.execute(f"SET plan_cache_mode = {mode}")
    plan = await _explain(conn, sql, types, args(claims))
    assert "ix_jobs_lease" not in plan, plan
    assert _join_filter_removed(plan) < 10 * BATCH, plan


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_finds_its_rows_by_id(plan_db: str, mode: str) -> None:
    """The claim, on the same table: 500 of 20,000 queued jobs, each found once."""
    conn, ids = await _queued_table(plan_db)
    try:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        plan = await _explain(
            conn, attempts._CLAIM, "uuid[], text, float8", [ids[:BATCH], WORKER, 60.0]
        )
    finally:
        await conn.close()
    assert "rows=500 " in plan, plan  # the claim's CTE returned every job asked for
    assert _join_filter_removed(plan) < 10 * BATCH, plan
