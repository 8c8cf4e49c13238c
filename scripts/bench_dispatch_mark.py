#!/usr/bin/env python
"""What a submission costs Postgres: the insert against the dispatch confirmation.

    .venv/bin/python scripts/bench_dispatch_mark.py [--jobs 20000] [--batch 1000] [--repeat 4]

Each round inserts N queued ``demo.echo`` rows with their ``submitted`` events in batches
(the statements' shape, without the API), then confirms their dispatch in batches (sets
``dispatched_at`` and ``dispatch_entry``, as the API's confirmation does, without its
guards), and reports jobs per second for each half and for both. Two schemas, interleaved
round by round so the machine's noise hits them alike:

- ``as shipped``: ``alembic upgrade head``;
- ``undispatched apart``: the listing and open-row indexes also leave out queued rows not yet
  confirmed, and one more index lists those by created time: what the insert would cost if
  its row entered the listings only when confirmed (a question for decision 0026).

Uses CONVEYOR_TEST_DATABASE_URL's server (two throwaway databases, dropped at the end).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark import infra

from app.db.migrate import upgrade
from app.jobs.ids import new_job_id

APART = "(status <> 'queued' OR dispatched_at IS NOT NULL)"
LISTING = (
    "ix_jobs_created",
    "ix_jobs_status_created",
    "ix_jobs_queue_created",
    "ix_jobs_type_created",
    "ix_jobs_owner_created",
    "ix_jobs_open",
    "ix_jobs_open_created",
)
INSERT = (
    "INSERT INTO jobs (id, type, queue, status, payload, enqueued_at)"
    " SELECT i, 'demo.echo', 'bench', 'queued', '{\"n\": 1}', now() FROM unnest($1::uuid[]) i"
)
EVENTS = (
    "INSERT INTO job_events (job_id, event, attempt)"
    " SELECT i, 'submitted', 0 FROM unnest($1::uuid[]) i"
)
CONFIRM = (
    "UPDATE jobs SET dispatched_at = now(), dispatch_entry = '1-1'"
    " WHERE id = ANY($1::uuid[]) AND status = 'queued' AND dispatched_at IS NULL"
)


def _dsn(server: str, database: str) -> str:
    return infra.dsn(infra.with_database(server, database))


async def _apart(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname = ANY($1::text[])",
            list(LISTING),
        )
        for name, definition in rows:
            await conn.execute(f'DROP INDEX "{name}"')
            await conn.execute(definition.replace(" WHERE ", f" WHERE {APART} AND "))
        await conn.execute(
            "CREATE INDEX ix_jobs_undispatched_created ON jobs (created_at DESC, id DESC)"
            " WHERE status = 'queued' AND dispatched_at IS NULL"
        )
    finally:
        await conn.close()


async def _round(dsn: str, n: int, batch: int) -> tuple[float, float, float]:
    """Jobs per second: insert and confirm together, the insert, the confirmation."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE jobs, job_events")
        ids = [new_job_id() for _ in range(n)]
        began = time.perf_counter()
        for k in range(0, n, batch):
            await conn.execute(INSERT, ids[k : k + batch])
            await conn.execute(EVENTS, ids[k : k + batch])
        inserted = time.perf_counter()
        for k in range(0, n, batch):
            await conn.execute(CONFIRM, ids[k : k + batch])
        confirmed = time.perf_counter()
    finally:
        await conn.close()
    return n / (confirmed - began), n / (inserted - began), n / (confirmed - inserted)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    server = os.environ.get(
        "CONVEYOR_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    tag = uuid.uuid4().hex[:8]
    variants = {"as shipped": f"bench_mark_a_{tag}", "undispatched apart": f"bench_mark_b_{tag}"}
    try:
        for name in variants.values():
            await infra.create_database(server, name)
            await asyncio.to_thread(upgrade, infra.with_database(server, name))
        await _apart(_dsn(server, variants["undispatched apart"]))
        rates: dict[str, list[tuple[float, float, float]]] = {label: [] for label in variants}
        for _ in range(args.repeat):
            for label, name in variants.items():
                rates[label].append(await _round(_dsn(server, name), args.jobs, args.batch))
        print(f"{args.jobs} jobs a round in batches of {args.batch}, {args.repeat} rounds")
        base = statistics.median(r[0] for r in rates["as shipped"])
        for label, rounds in rates.items():
            both, insert, confirm = (statistics.median(r[i] for r in rounds) for i in range(3))
            print(
                f"{label:20s} insert + confirm {both:8,.0f} jobs/s ({both / base:.2f}x)"
                f"  insert alone {insert:8,.0f}  confirmation alone {confirm:8,.0f}"
            )
    finally:
        for name in variants.values():
            await infra.drop_database(server, name)


if __name__ == "__main__":
    asyncio.run(main())
