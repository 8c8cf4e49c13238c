#!/usr/bin/env python
"""What a job's claim and completion cost Postgres, and what of it the indexes and the event
rows are: the ceiling of one worker's drain, with no Redis and no Python handler in the way.

    .venv/bin/python scripts/bench_statements.py [--jobs 5000] [--batches 64,500] [--repeat 5]

Each round inserts N queued ``demo.echo`` rows, then runs the worker's own statements
(``attempts.claim_many`` then ``attempts.complete_many`` as success, one batch after the
other on one connection; a batch of successes takes ``attempts._SUCCEED``) and reports jobs
per second and WAL bytes per job. Four variants, interleaved round by round so that the
machine's noise hits them alike:

- ``as shipped``: the schema of ``alembic upgrade head`` and the statements as they are;
- ``no event rows``: the same statements without their ``job_events`` inserts;
- ``no secondary indexes``: every index of ``jobs`` but its primary key dropped;
- ``neither``.

Figures are medians over ``--repeat`` rounds with the ratio to ``as shipped``. Uses
CONVEYOR_TEST_DATABASE_URL's server (two throwaway databases, dropped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade
from app.jobs import attempts
from app.jobs.attempts import Completion
from app.jobs.ids import new_job_id
from app.jobs.repository import Backoff

CLAIM_EVENTS = (
    "INSERT INTO job_events (job_id, event, attempt, worker)\n"
    "    SELECT id, 'claimed', attempts, $2 FROM claimed"
)
COMPLETE_RESULT = "SELECT id, status, attempts, type, queue, errors, age FROM done"
SUCCEED_RESULT = "SELECT id, age FROM done"  # a batch of successes (attempts._SUCCEED)


def _without_events(claim: str, complete: str, succeed: str) -> tuple[str, str, str]:
    """The statements with their event inserts cut out (nothing else changes)."""
    assert CLAIM_EVENTS in claim and "), ev AS (" in complete and "), ev AS (" in succeed
    head = complete[: complete.index("), ev AS (")]
    lean = succeed[: succeed.index("), ev AS (")]
    return (
        claim.replace(CLAIM_EVENTS, "SELECT 1"),
        f"{head})\n{COMPLETE_RESULT}",
        f"{lean})\n{SUCCEED_RESULT}",
    )


def _dsn(url: str, database: str | None = None) -> str:
    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


async def _round(
    dsn: str, n: int, batch: int, statements: tuple[str, str, str]
) -> tuple[float, float]:
    """Jobs per second and WAL bytes per job for one drain of ``n`` rows."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE jobs, job_events")
        ids = [new_job_id() for _ in range(n)]
        await conn.execute(
            "INSERT INTO jobs (id, type, queue, status, payload, enqueued_at, dispatched_at)"
            " SELECT i, 'demo.echo', 'bench', 'queued', '{\"n\": 1}', now(), now()"
            " FROM unnest($1::uuid[]) i",
            ids,
        )
        await conn.execute("VACUUM ANALYZE jobs")
        shipped = attempts._CLAIM, attempts._COMPLETE, attempts._SUCCEED
        attempts._CLAIM, attempts._COMPLETE, attempts._SUCCEED = statements
        try:
            before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
            began = time.perf_counter()
            for k in range(0, n, batch):
                claimed = await attempts.claim_many(conn, ids[k : k + batch], "bench", 60)
                done = [Completion(c.id, c.token, '{"ok": true}') for c in claimed]
                await attempts.complete_many(conn, "bench", done, Backoff(1.0, 300.0))
            elapsed = time.perf_counter() - began
            after = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
        finally:
            attempts._CLAIM, attempts._COMPLETE, attempts._SUCCEED = shipped
        wal = await conn.fetchval("SELECT pg_wal_lsn_diff($1, $2)", after, before)
        return n / elapsed, float(wal) / n
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--batches", default="64,500")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    server = os.environ.get(
        "CONVEYOR_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    tag = uuid.uuid4().hex[:8]
    full, bare = f"bench_stmt_full_{tag}", f"bench_stmt_bare_{tag}"
    admin = await asyncpg.connect(_dsn(server))
    try:
        for name in (full, bare):
            await admin.execute(f'CREATE DATABASE "{name}"')
            url = make_url(server).set(database=name).render_as_string(hide_password=False)
            await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(_dsn(server, bare))
        try:
            names = await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'"
                " AND indexname <> 'pk_jobs'"
            )
            for row in names:
                await conn.execute(f'DROP INDEX "{row["indexname"]}"')
        finally:
            await conn.close()
        shipped = (attempts._CLAIM, attempts._COMPLETE, attempts._SUCCEED)
        lean = _without_events(*shipped)
        variants = {
            "as shipped": (full, shipped),
            "no event rows": (full, lean),
            "no secondary indexes": (bare, shipped),
            "neither": (bare, lean),
        }
        batches = [int(b) for b in args.batches.split(",")]
        rates: dict[tuple[int, str], list[float]] = {}
        wals: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.repeat):
            for b in batches:
                for label, (db, statements) in variants.items():
                    rate, wal = await _round(_dsn(server, db), args.jobs, b, statements)
                    rates.setdefault((b, label), []).append(rate)
                    wals.setdefault((b, label), []).append(wal)
        print(f"{args.jobs} jobs a round, {args.repeat} rounds; claim + complete on one connection")
        for b in batches:
            base = statistics.median(rates[(b, "as shipped")])
            for label in variants:
                r = rates[(b, label)]
                med = statistics.median(r)
                print(
                    f"batch {b:4d}  {label:21s} {med:8,.0f} jobs/s"
                    f" (range {min(r):,.0f}-{max(r):,.0f}; {med / base:.2f}x as shipped)"
                    f"  WAL {statistics.median(wals[(b, label)]):,.0f} B/job"
                )
    finally:
        for name in (full, bare):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
