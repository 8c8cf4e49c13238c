#!/usr/bin/env python
"""One maintenance poll's cost against other queues' backlogs. Prints figures; asserts nothing.

    .venv/bin/python scripts/bench_maintenance.py [--rows 1000000] [--database-url URL] [--keep]

Every worker polls, every CONVEYOR_PROMOTE_INTERVAL_SECONDS (0.25 s), for its own queues:
promotion of due scheduled and retrying jobs (``repository.promote_due``) and the undispatched
sweep (``marks.undispatched_bands``, then a page per band with work). This creates a
throwaway database on the server of ``--database-url`` (default CONVEYOR_TEST_DATABASE_URL,
then CONVEYOR_DATABASE_URL; without either, an embedded PostgreSQL), migrates it, gives the
served queue ``mine`` a small fixed load (100 due scheduled, 100 due retrying, 100 queued
undispatched in each band) and grows the backlog of one queue nobody serves (``unserved``: a
third each due scheduled, due retrying, queued undispatched) in steps up to ``--rows``. At
each step, after VACUUM ANALYZE, it runs EXPLAIN (ANALYZE, BUFFERS) of the poll's statements
twice in a transaction that is rolled back and reports the warm run:

- promotion's selection of due rows, and the sweep's two reads (which bands have work, then
  one band's page), with the migrated indexes (queue first, 0009); and the entry check's page
  (it runs once per reconcile, not per poll);
- baseline, in the same run and transaction: the indexes as they were before 0009 (no queue
  column), promotion's selection as it was (an unordered ``LIMIT`` over an ``OR``) and the
  sweep's statement as it was (``ORDER BY enqueued_at LIMIT 1000`` over the
  worker's queues, rows locked).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade
from app.devserver import EmbeddedPostgres
from app.jobs import marks, repository

STEPS = (0.01, 0.1, 1.0)  # fractions of --rows in the unserved queue's backlog

# The old sweep statement (before 0009) and the old indexes, rebuilt for the baseline.
OLD_SWEEP = (
    "SELECT id, queue, priority FROM jobs WHERE status = 'queued'"
    " AND dispatched_at IS NULL AND queue = ANY(CAST(:queues AS text[]))"
    " AND enqueued_at < now() - make_interval(secs => :grace)"
    " ORDER BY enqueued_at LIMIT 1000 FOR UPDATE SKIP LOCKED"
)
OLD_INDEXES = (
    "DROP INDEX ix_jobs_scheduled_due",
    "DROP INDEX ix_jobs_retrying_due",
    "DROP INDEX ix_jobs_undispatched",
    "CREATE INDEX ix_jobs_scheduled_due ON jobs (run_at) WHERE status = 'scheduled'",
    "CREATE INDEX ix_jobs_retrying_due ON jobs (next_attempt_at) WHERE status = 'retrying'",
    "CREATE INDEX ix_jobs_undispatched ON jobs (enqueued_at)"
    " WHERE status = 'queued' AND dispatched_at IS NULL",
    "ANALYZE jobs",
)

GENERATE = """
INSERT INTO jobs (id, type, queue, status, priority, payload, created_at, run_at, enqueued_at,
                  next_attempt_at)
SELECT gen_random_uuid(), 'demo.echo', :queue, s.status,
       CASE WHEN :queue = 'mine' THEN g / 3 % 2 ELSE (g / 3 % 3) - 1 END, '{}',
       now() - make_interval(secs => 60 + g * 0.001), now() - make_interval(secs => 60),
       CASE WHEN s.status = 'queued' THEN now() - make_interval(secs => 60 + g * 0.001) END,
       CASE WHEN s.status = 'retrying' THEN now() - make_interval(secs => 60) END
FROM generate_series(CAST(:first AS int), CAST(:last AS int)) AS g
CROSS JOIN LATERAL (SELECT (ARRAY['scheduled', 'retrying', 'queued'])[g % 3 + 1] AS status) s
"""
# Rows of the served queue that a poll must not walk either: scheduled for later, and queued
# with their dispatch confirmed (waiting in the stream).
NOT_DUE = """
INSERT INTO jobs (id, type, queue, status, payload, created_at, run_at, enqueued_at,
                  dispatched_at)
SELECT gen_random_uuid(), 'demo.echo', 'mine', s.status, '{}', now(),
       CASE WHEN s.status = 'scheduled' THEN now() + interval '1 hour' ELSE now() END,
       CASE WHEN s.status = 'queued' THEN now() - interval '1 minute' END,
       CASE WHEN s.status = 'queued' THEN now() END
FROM generate_series(1, CAST(:n AS int)) AS g
CROSS JOIN LATERAL (SELECT (ARRAY['scheduled', 'queued'])[g % 2 + 1] AS status) s
"""
POLL_PARAMS = {"queues": ["mine"], "limit": 1000, "grace": 5.0}


@dataclass(frozen=True)
class Measured:
    ms: float
    nodes: str
    buffers: int


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(_dsn(server_url))
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
        where = node.get("Index Name")
        if where:
            parts.append(f"{node['Node Type']}({where})")
        elif node["Node Type"] == "Seq Scan":
            parts.append(f"Seq Scan({node['Relation Name']})")
    top = plan["Plan"]
    buffers = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return Measured(float(plan["Execution Time"]), " + ".join(parts), buffers)


async def explain(conn: AsyncConnection, sql: str, params: dict[str, Any]) -> Measured:
    """EXPLAIN (ANALYZE, BUFFERS) twice inside a savepoint rolled back each time (promotion
    updates rows); the second, warm run counts."""
    result: Measured | None = None
    for _ in range(2):
        savepoint = await conn.begin_nested()
        raw = await conn.scalar(text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql), params)
        await savepoint.rollback()
        result = _describe(raw[0])
    assert result is not None
    return result


# The selection of repository.promote_due (its ``due`` part; the rest updates the rows found).
PROMOTE_DUE = repository._PROMOTE.split("), upd AS (")[0].removeprefix("\nWITH due AS (")
# And as it was before 0009.
OLD_PROMOTE_DUE = """
SELECT id FROM jobs
WHERE ((status = 'scheduled' AND run_at <= now())
       OR (status = 'retrying' AND next_attempt_at <= now()))
  AND queue = ANY(CAST(:queues AS text[]))
LIMIT :limit FOR UPDATE SKIP LOCKED
"""


def _now() -> dict[str, tuple[str, dict[str, Any]]]:
    page = {"queue": "mine", "sign": 0, "grace": 5.0, "limit": 1000}
    first = {"at": marks.FIRST.at, "id": marks.FIRST.id}
    latest = {"at": marks.LATEST.created_at, "id": marks.LATEST.id}
    check = {"queue": "mine", "older": 120.0, "limit": 1000}
    return {
        "promote": (PROMOTE_DUE, POLL_PARAMS),
        "sweep (bands)": (marks._BANDS_WAITING, POLL_PARAMS),
        "sweep (page)": (marks._WAITING_PAGE, page | first),
        "entry check": (marks._QUEUED_PAGE, check | latest),
    }


async def measure(engine: AsyncEngine) -> tuple[dict[str, Measured], dict[str, Measured]]:
    """The poll's statements with the 0009 indexes, then before 0009 (old indexes, old sweep
    statement), in one transaction rolled back."""
    async with engine.connect() as conn:
        trans = await conn.begin()
        now = {name: await explain(conn, sql, p) for name, (sql, p) in _now().items()}
        for statement in OLD_INDEXES:
            await conn.execute(text(statement))
        before = {
            "promote": await explain(conn, OLD_PROMOTE_DUE, POLL_PARAMS),
            "sweep": await explain(conn, OLD_SWEEP, POLL_PARAMS),
        }
        await trans.rollback()
    return now, before


async def fill(engine: AsyncEngine, queue: str, first: int, last: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(GENERATE), {"queue": queue, "first": first, "last": last})
    async with engine.connect() as conn:
        await conn.execute(text("COMMIT"))
        await conn.execute(text("VACUUM ANALYZE jobs"))


async def bench(database_url: str, rows: int) -> None:
    engine = create_async_engine(database_url)
    try:
        # 300 due scheduled, 300 due retrying, 300 undispatched in the high and default bands
        # (none in the low band: its probe finds nothing, the common case of an idle poll)
        await fill(engine, "mine", 1, 900)
        done = 0
        print("one poll of queue 'mine' (a fixed load) while the unserved queue's backlog grows;")
        print("last line: 'mine' itself also holds jobs not due (scheduled later, or queued")
        print("with their entries confirmed)")
        print("warm EXPLAIN ANALYZE execution time in ms (shared buffers)")
        print(
            f"{'unserved backlog':>17} | {'promote, 0009':>16} | {'before':>16} |"
            f" {'sweep, 0009':>16} | {'before':>16} | {'entry check':>16}"
        )
        for step in STEPS:
            target = int(rows * step)
            await fill(engine, "unserved", done + 1, target)
            done = target
            now, before = await measure(engine)
            print(_line(f"{done:,}", now, before))
        async with engine.begin() as conn:
            await conn.execute(text(NOT_DUE), {"n": rows // 5})
        async with engine.connect() as conn:
            await conn.execute(text("COMMIT"))
            await conn.execute(text("VACUUM ANALYZE jobs"))
        now, before = await measure(engine)
        print(_line(f"+{rows // 5:,} of mine", now, before))
        print("plans at the last step:")
        for name, m in now.items():
            print(f"  {name}, 0009: {m.nodes}")
        for name, m in before.items():
            print(f"  {name}, before: {m.nodes}")
    finally:
        await engine.dispose()


def _line(label: str, now: dict[str, Measured], before: dict[str, Measured]) -> str:
    bands, page = now["sweep (bands)"], now["sweep (page)"]
    sweep = Measured(bands.ms + page.ms, "", bands.buffers + page.buffers)
    return (
        f"{label:>17} | {_cell(now['promote'])} | {_cell(before['promote'])} |"
        f" {_cell(sweep)} | {_cell(before['sweep'])} | {_cell(now['entry check'])}"
    )


def _cell(m: Measured) -> str:
    return f"{m.ms:7.3f} ({m.buffers:6})"


def run(server_url: str, rows: int, keep: bool) -> None:
    name = f"conveyor_bench_maintenance_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
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
