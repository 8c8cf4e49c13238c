#!/usr/bin/env python
"""Listing and queue-stats plans on a big jobs table. Prints figures; asserts nothing.

    .venv/bin/python scripts/bench_listing.py [--rows 1000000] [--database-url URL] [--keep]

Creates a throwaway database on the server of ``--database-url`` (default
CONVEYOR_TEST_DATABASE_URL, then CONVEYOR_DATABASE_URL; without either, an embedded
PostgreSQL), migrates it, inserts ``--rows`` jobs with one generate_series statement
(80% succeeded, the rest spread over the other statuses; 20 types, 10 queues, 4 owners,
spread independently of each other; one job every 2 s into the past), runs VACUUM ANALYZE,
then for each query shape runs EXPLAIN (ANALYZE, BUFFERS) twice and reports the warm run:

- the listing query of ``GET /v1/jobs`` (``app.jobs.queries.listing``): the first page and a
  page deep in the table (a cursor 90% of the way down), without and with filters;
- baseline A, in the same run: the same query with index scans turned off
  (``SET LOCAL enable_indexscan/enable_indexonlyscan/enable_bitmapscan = off``), i.e. what a
  page would cost without the indexes;
- baseline B for deep pages: the same page fetched with OFFSET instead of the keyset cursor;
- the ``GET /v1/queues`` counts (``QUEUE_COUNTS``), against a forced full-table scan.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Select, func, text, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade
from app.db.models import JobRow
from app.db.url import asyncpg_dsn, with_database
from app.devserver import EmbeddedPostgres
from app.jobs.queries import QUEUE_COUNTS, Cursor, JobFilter, listing
from app.jobs.status import JobStatus

PAGE = 50
NO_INDEXES = (
    "SET LOCAL enable_indexscan = off",
    "SET LOCAL enable_indexonlyscan = off",
    "SET LOCAL enable_bitmapscan = off",
)

GENERATE = """
INSERT INTO jobs (id, type, queue, status, payload, attempts, owner, created_at, run_at,
                  finished_at)
SELECT gen_random_uuid(), 'type.' || (g / 3 % 20), 'queue-' || (g / 7 % 10), s.status,
       jsonb_build_object('n', g), 1,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'producer:' || (g / 11 % 4) END,
       now() - make_interval(secs => g * 2), now() - make_interval(secs => g * 2),
       CASE WHEN s.status IN ('succeeded', 'dead', 'cancelled')
            THEN now() - make_interval(secs => g * 2 - 1) END
FROM generate_series(1, :n) AS g
CROSS JOIN LATERAL (SELECT CASE
    WHEN g % 100 < 80 THEN 'succeeded' WHEN g % 100 < 85 THEN 'dead'
    WHEN g % 100 < 90 THEN 'queued' WHEN g % 100 < 93 THEN 'cancelled'
    WHEN g % 100 < 96 THEN 'scheduled' WHEN g % 100 < 98 THEN 'retrying'
    ELSE 'running' END AS status) AS s
"""


@dataclass(frozen=True)
class Measured:
    ms: float
    nodes: str
    buffers: int


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _describe(plan: dict[str, Any]) -> Measured:
    parts = []
    for node in _walk(plan["Plan"]):
        kind = node["Node Type"]
        if kind in ("Limit", "Gather", "Gather Merge"):
            continue
        where = node.get("Index Name") or node.get("Relation Name")
        parts.append(f"{kind}({where})" if where else kind)
    top = plan["Plan"]
    buffers = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return Measured(float(plan["Execution Time"]), " > ".join(parts), buffers)


async def explain(engine: AsyncEngine, sql: str, settings: tuple[str, ...] = ()) -> Measured:
    """EXPLAIN (ANALYZE, BUFFERS) twice; the second, warm run counts."""
    result: Measured | None = None
    for _ in range(2):
        async with engine.begin() as conn:
            for setting in settings:
                await conn.execute(text(setting))
            raw = await conn.scalar(text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql))
            result = _describe(raw[0])
    assert result is not None
    return result


def sql_of(engine: AsyncEngine, stmt: Select[Any]) -> str:
    compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    return str(compiled)


def scenarios(now: datetime) -> dict[str, JobFilter]:
    return {
        "no filter": JobFilter(),
        "status=queued": JobFilter(status=JobStatus.QUEUED),
        "status=retrying": JobFilter(status=JobStatus.RETRYING),
        "type=type.3": JobFilter(type="type.3"),
        "queue=queue-4": JobFilter(queue="queue-4"),
        "status+queue": JobFilter(status=JobStatus.QUEUED, queue="queue-4"),
        "status+queue, finished": JobFilter(status=JobStatus.CANCELLED, queue="queue-4"),
        "status+type+queue": JobFilter(status=JobStatus.DEAD, type="type.5", queue="queue-5"),
        "type+created range": JobFilter(
            type="type.7", created_after=now - timedelta(days=20), created_before=now
        ),
        "owner (a producer's own)": JobFilter(owner="producer:1"),
        "owner with no jobs": JobFilter(owner="producer:nobody"),
    }


async def deep_cursor(engine: AsyncEngine, rows: int) -> Cursor:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT created_at, id FROM jobs ORDER BY created_at DESC, id DESC"
                    " OFFSET :n LIMIT 1"
                ),
                {"n": int(rows * 0.9)},
            )
        ).one()
    return Cursor(row.created_at, row.id)


def _row(label: str, page: str, m: Measured, base: Measured, offset: Measured | None) -> str:
    ratio = base.ms / m.ms if m.ms else float("inf")
    extra = f"  offset: {offset.ms:9.2f} ms" if offset else ""
    return (
        f"{label:26} {page:5} {m.ms:9.3f} ms {m.buffers:7} buf | no-index {base.ms:9.2f} ms"
        f" {base.buffers:7} buf (x{ratio:,.0f}){extra}\n    plan: {m.nodes}\n"
        f"    no-index plan: {base.nodes}"
    )


async def listing_report(engine: AsyncEngine, rows: int) -> None:
    now = datetime.now(UTC)
    deep = await deep_cursor(engine, rows)
    print(f"\nGET /v1/jobs, limit {PAGE}: warm EXPLAIN ANALYZE execution time, shared buffers")
    for label, f in scenarios(now).items():
        for page, cursor in (("first", None), ("deep", deep)):
            sql = sql_of(engine, listing(f, PAGE, cursor))
            measured = await explain(engine, sql)
            baseline = await explain(engine, sql, NO_INDEXES)
            offset = None
            if cursor is not None:
                skip = await _offset_of(engine, f, cursor)
                by_offset = listing(f, PAGE, None).offset(skip)
                offset = await explain(engine, sql_of(engine, by_offset))
            print(_row(label, page, measured, baseline, offset))


async def _offset_of(engine: AsyncEngine, f: JobFilter, cursor: Cursor) -> int:
    """How many rows come before the cursor under this filter (the OFFSET baseline's skip)."""
    stmt = listing(f, 0, None).order_by(None).limit(None).with_only_columns(func.count())
    stmt = stmt.where(tuple_(JobRow.created_at, JobRow.id) >= (cursor.at, cursor.id))
    async with engine.connect() as conn:
        return int(await conn.scalar(stmt) or 0)


async def queue_report(engine: AsyncEngine) -> None:
    measured = await explain(engine, QUEUE_COUNTS)
    full = await explain(engine, QUEUE_COUNTS, NO_INDEXES)
    print("\nGET /v1/queues counts")
    print(f"  partial index ix_jobs_open: {measured.ms:9.2f} ms {measured.buffers:7} buf")
    print(f"    plan: {measured.nodes}")
    print(f"  forced full scan:           {full.ms:9.2f} ms {full.buffers:7} buf")
    print(f"    plan: {full.nodes}")


async def fill(engine: AsyncEngine, rows: int) -> None:
    started = time.monotonic()
    async with engine.begin() as conn:
        await conn.execute(text(GENERATE), {"n": rows})
    async with engine.connect() as conn:
        await conn.execute(text("COMMIT"))
        await conn.execute(text("VACUUM ANALYZE jobs"))
        size = await conn.scalar(text("SELECT pg_size_pretty(pg_total_relation_size('jobs'))"))
    print(f"inserted {rows:,} jobs and analysed in {time.monotonic() - started:.1f}s ({size})")


async def bench(database_url: str, rows: int) -> None:
    engine = create_async_engine(database_url)
    try:
        await fill(engine, rows)
        await listing_report(engine, rows)
        await queue_report(engine)
    finally:
        await engine.dispose()


def run(server_url: str, rows: int, keep: bool) -> None:
    name = f"conveyor_bench_listing_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = with_database(server_url, name)
    try:
        upgrade(url)
        asyncio.run(bench(url, rows))
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    url = (
        args.database_url
        or os.environ.get("CONVEYOR_TEST_DATABASE_URL")
        or os.environ.get("CONVEYOR_DATABASE_URL")
    )
    if url:
        run(url, args.rows, args.keep)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        try:
            run(pg.start(), args.rows, args.keep)
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
