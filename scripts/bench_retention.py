#!/usr/bin/env python
"""Retention pruning on a table of millions of finished jobs, with a submit-latency probe.

    .venv/bin/python scripts/bench_retention.py [--rows 3000000] [--seconds 30] [--smoke]
        [--database-url URL] [--json FILE] [--keep]

Creates a throwaway database on the server of ``--database-url`` (default
CONVEYOR_TEST_DATABASE_URL, then CONVEYOR_DATABASE_URL; without either, an embedded
PostgreSQL), migrates it, and loads ``--rows`` finished jobs (80% succeeded, 10% dead, 10%
cancelled, over 4 types, finished evenly over the last 40 days) with 3 events each, by
``INSERT ... SELECT generate_series`` (indexes rebuilt after the load). With the default
retention (succeeded and cancelled 7 days, dead 30 days) about 78% of them are expired.

Then, for ``--seconds`` each:

1. the probe alone: one submit every 10 ms, with the API's own insert statement
   (``app.jobs.insertion.INSERT``: the job and its ``submitted`` event), on its own connection;
2. the probe while the workers' pruning duty (``app.jobs.retention.prune_pass``, the same
   batches, lock and statements as ``workers/maintenance.py``) runs back to back.

It prints the prune rate (jobs deleted per second, with their events; it must keep up with
1,000 finished jobs per second), submit p50/p99 without and with pruning and their ratio,
the cost of a pass with nothing to delete, and the plans of the two prune statements
(EXPLAIN ANALYZE, rolled back). ``--smoke`` runs the same with tiny numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade
from app.devserver import EmbeddedPostgres
from app.jobs import insertion, retention
from app.jobs.newjob import NewJob
from app.jobs.retention import Policy
from app.jobs.status import JobStatus
from app.settings import Settings

DAY = 86400
PROBE_EVERY = 0.01

LOAD_JOBS = """
INSERT INTO jobs (id, type, queue, status, payload, result, attempts, created_at, run_at,
                  started_at, finished_at, errors)
SELECT gen_random_uuid(), 'bench.t' || (i % 4), 'default',
    CASE i % 10 WHEN 0 THEN 'dead' WHEN 1 THEN 'cancelled' ELSE 'succeeded' END,
    '{"n": 1}', CASE WHEN i % 10 > 1 THEN '{"ok": true}'::jsonb END,
    CASE WHEN i % 10 = 1 THEN 0 ELSE 1 END, ts - interval '2 seconds', ts - interval '2 seconds',
    CASE WHEN i % 10 <> 1 THEN ts - interval '1 second' END, ts,
    CASE WHEN i % 10 = 0 THEN '[{"attempt": 1, "error": "boom"}]'::jsonb ELSE '[]' END
FROM generate_series($1::bigint, $2::bigint) AS i,
    LATERAL (SELECT now() - (i::float8 / $3) * interval '40 days' AS ts) AS t
"""
LOAD_EVENTS = """
INSERT INTO job_events (job_id, at, event, attempt)
SELECT j.id, j.finished_at, e.event, 1 FROM jobs j,
    LATERAL (VALUES ('submitted'), ('claimed'), (j.status)) AS e(event)
"""


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(_dsn(server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def load(conn: asyncpg.Connection, rows: int) -> float:
    """Bulk load with the secondary indexes and the events' foreign key check off, then
    rebuild them: minutes instead of hours for millions of rows."""
    started = time.monotonic()
    indexes = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('jobs', 'job_events')"
        " AND indexname NOT LIKE 'pk_%'"
    )
    await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '256MB'")
    for index in indexes:
        await conn.execute(f'DROP INDEX "{index["indexname"]}"')
    await conn.execute("ALTER TABLE job_events DISABLE TRIGGER ALL")
    step = 500_000
    for first in range(1, rows + 1, step):
        await conn.execute(LOAD_JOBS, first, min(rows, first + step - 1), rows)
    await conn.execute(LOAD_EVENTS)
    await conn.execute("ALTER TABLE job_events ENABLE TRIGGER ALL")
    for index in indexes:
        await conn.execute(index["indexdef"])
    await conn.execute("VACUUM ANALYZE jobs")
    await conn.execute("VACUUM ANALYZE job_events")
    return time.monotonic() - started


def _job() -> NewJob:
    return NewJob(
        id=uuid.uuid4(),
        type="bench.t0",
        queue="probe",
        status=JobStatus.QUEUED,
        priority=0,
        payload_json='{"n": 1}',
        max_attempts=3,
        timeout_seconds=None,
        idempotency_key=None,
        idempotency_scope="",
        request_hash=None,
        owner=None,
        run_at=None,
    )


async def probe(conn: asyncpg.Connection, seconds: float) -> list[float]:
    """Submit latencies (ms), one submit every PROBE_EVERY seconds."""
    latencies: list[float] = []
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < seconds:
        t0 = time.perf_counter()
        await insertion.insert(conn, [_job()])
        latencies.append((time.perf_counter() - t0) * 1000)
        n += 1
        await asyncio.sleep(max(0.0, start + n * PROBE_EVERY - time.monotonic()))
        del now
    return latencies


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def prune_for(conn: asyncpg.Connection, policy: Policy, seconds: float) -> tuple[int, float]:
    deleted, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        pruned = await retention.prune_pass(
            conn, policy, budget_seconds=max(0.1, seconds - (time.monotonic() - start))
        )
        deleted += pruned.total
        if not pruned.more and not pruned.total:
            break
    return deleted, time.monotonic() - start


async def _timed(work: Awaitable[object]) -> float:
    t0 = time.perf_counter()
    await work
    return (time.perf_counter() - t0) * 1000


async def plans(conn: asyncpg.Connection, policy: Policy) -> dict[str, str]:
    out: dict[str, str] = {}
    seconds = policy.seconds(JobStatus.SUCCEEDED, "bench.t1")
    tr = conn.transaction()
    await tr.start()
    try:
        for name, sql, args in (
            ("types of a status (skip scan)", retention._TYPES, ("succeeded",)),
            (
                "one delete batch",
                retention._DELETE,
                ("succeeded", "bench.t1", seconds, retention.PRUNE_BATCH),
            ),
        ):
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args)
            out[name] = "\n".join(r[0] for r in rows)
    finally:
        await tr.rollback()
    return out


async def bench(url: str, rows: int, seconds: float) -> dict[str, Any]:
    dsn = _dsn(url)
    loader, prober, pruner = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        load_s = await load(loader, rows)
        policy = Policy.of(Settings())
        expired = await loader.fetchval(
            "SELECT count(*) FROM jobs WHERE finished_at < now() - CASE status"
            " WHEN 'dead' THEN interval '30 days' ELSE interval '7 days' END"
        )
        alone = await probe(prober, seconds)
        with_prune, (deleted, prune_s) = await asyncio.gather(
            probe(prober, seconds), prune_for(pruner, policy, seconds)
        )
        explained = await plans(loader, policy)
        idle_policy = Policy({s: 365 * DAY * 50 for s in policy.default})
        idle_ms = await _timed(retention.prune_pass(pruner, idle_policy))
        await loader.execute("VACUUM jobs")  # what autovacuum does after a large delete
        idle_vacuumed_ms = await _timed(retention.prune_pass(pruner, idle_policy))
    finally:
        for conn in (loader, prober, pruner):
            await conn.close()
    figures = {
        "rows": rows,
        "expired_at_start": expired,
        "load_seconds": round(load_s, 1),
        "deleted": deleted,
        "prune_seconds": round(prune_s, 2),
        "prune_rate_per_s": round(deleted / prune_s, 1) if prune_s else 0.0,
        "submit_p50_ms": round(statistics.median(alone), 2),
        "submit_p99_ms": round(_pct(alone, 0.99), 2),
        "submit_p50_ms_pruning": round(statistics.median(with_prune), 2),
        "submit_p99_ms_pruning": round(_pct(with_prune, 0.99), 2),
        "idle_pass_ms": round(idle_ms, 2),
        "idle_pass_ms_vacuumed": round(idle_vacuumed_ms, 2),
        "plans": explained,
    }
    figures["p99_ratio"] = round(figures["submit_p99_ms_pruning"] / figures["submit_p99_ms"], 2)
    figures["p50_ratio"] = round(figures["submit_p50_ms_pruning"] / figures["submit_p50_ms"], 2)
    return figures


def report(f: dict[str, Any]) -> None:
    print(
        f"rows loaded: {f['rows']:,} in {f['load_seconds']} s; expired: {f['expired_at_start']:,}"
    )
    print(
        f"prune rate: {f['prune_rate_per_s']:,.0f} jobs/s"
        f" ({f['deleted']:,} jobs and their events in {f['prune_seconds']} s)"
        f" — keeps up with 1,000 jobs/s: {'yes' if f['prune_rate_per_s'] >= 1000 else 'NO'}"
    )
    print("| submit | alone | while pruning | ratio |")
    print("| --- | --- | --- | --- |")
    for p in ("p50", "p99"):
        print(
            f"| {p} | {f[f'submit_{p}_ms']} ms | {f[f'submit_{p}_ms_pruning']} ms"
            f" | {f[f'{p}_ratio']} |"
        )
    print(
        f"a pass with nothing to delete: {f['idle_pass_ms']} ms right after the deletes,"
        f" {f['idle_pass_ms_vacuumed']} ms once vacuumed"
    )
    for name, plan in f["plans"].items():
        print(f"\nEXPLAIN ANALYZE, {name}:\n{plan}")


def run(server_url: str, rows: int, seconds: float, keep: bool) -> dict[str, Any]:
    name = f"conveyor_bench_retention_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        figures = asyncio.run(bench(url, rows, seconds))
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    figures["database"] = name
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--smoke", action="store_true", help="tiny numbers, for the tests")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    rows, seconds = (5_000, 0.5) if args.smoke else (args.rows, args.seconds)
    url = (
        args.database_url
        or os.environ.get("CONVEYOR_TEST_DATABASE_URL")
        or os.environ.get("CONVEYOR_DATABASE_URL")
    )
    if url:
        figures = run(url, rows, seconds, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pg = EmbeddedPostgres(Path(tmp))
            try:
                figures = run(pg.start(), rows, seconds, args.keep)
            finally:
                pg.stop()
    report(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
