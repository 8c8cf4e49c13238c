#!/usr/bin/env python
"""Where submit→start latency goes at an offered rate, and what Postgres waits on meanwhile.

    .venv/bin/python scripts/bench_latency.py [--rates 200,1000] [--seconds 8]
        [--api-workers 2] [--concurrency 64] [--smoke] [--json FILE]

Starts ``conveyor api`` and one ``conveyor worker`` on a throwaway database (on the server of
CONVEYOR_TEST_DATABASE_URL and CONVEYOR_TEST_REDIS_URL; without them, embedded servers), then
for each rate POSTs single ``demo.echo`` jobs open loop (as ``scripts/bench.py`` does, each
carrying the time it was due; after a warm-up at the same rate that is not counted) and
splits every job's latency in two:

- **due → created_at**: the submitter's own lag (its timer wakes up to a millisecond late;
  reported apart), the request, the API's validation and the wait for its group's insert
  (``created_at`` is the start of the inserting transaction);
- **created_at → started_at**: the insert and its commit, the XADD, the worker's read and
  the start of its claim (``started_at`` is the claim's transaction start).

Beside them: the worker's and the API's CPU per job, Postgres commits per job, and what
Postgres's client backends were doing, sampled every 20 ms from ``pg_stat_activity``
(``CPU`` when active and not waiting). ``--smoke`` runs one short step (for the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark import infra, load
from benchmark.conveyor import Conveyor
from benchmark.stats import percentile

from app.db.url import asyncpg_dsn

SAMPLE_EVERY = 0.02
_SAMPLE = """
SELECT CASE WHEN wait_event_type IS NULL THEN 'CPU'
            ELSE wait_event_type || ':' || wait_event END
FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND state <> 'idle'
  AND pid <> pg_backend_pid()
"""
_ROWS = """
SELECT CAST(payload->>'t' AS float8) AS due, extract(epoch FROM created_at) AS created,
       extract(epoch FROM started_at) AS started
FROM jobs WHERE queue = $1 AND payload ? 't'
"""


async def _sample(conn: asyncpg.Connection, name: str, seen: collections.Counter[str]) -> None:
    while True:
        for row in await conn.fetch(_SAMPLE, name):
            seen[row[0]] += 1
        await asyncio.sleep(SAMPLE_EVERY)


async def _commits(conn: asyncpg.Connection, name: str) -> int:
    value = await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", name)
    return int(value or 0)


def _split(rows: list[asyncpg.Record]) -> dict[str, float]:
    first = [(float(r["created"]) - r["due"]) * 1000 for r in rows]
    second = [(float(r["started"]) - float(r["created"])) * 1000 for r in rows if r["started"]]
    total = [(float(r["started"]) - r["due"]) * 1000 for r in rows if r["started"]]
    figures: dict[str, float] = {}
    for label, values in (("due_created", first), ("created_started", second), ("total", total)):
        figures[f"{label}_p50_ms"] = percentile(values, 50)
        figures[f"{label}_p99_ms"] = percentile(values, 99)
    return figures


def _cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    return sum(infra.cpu_seconds(p.pid) for p in procs)


async def step(
    c: Conveyor,
    workers: list[subprocess.Popen[bytes]],
    conn: asyncpg.Connection,
    name: str,
    queue: str,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """One offered rate on its own queue; the figures of :func:`report`."""
    assert c.api
    api = [c.api]

    def body(due: float) -> bytes:
        return json.dumps({"type": "demo.echo", "queue": queue, "payload": {"t": due}}).encode()

    async def started(sent: list[load.Sent]) -> list[asyncpg.Record]:
        """The rows of the jobs of ``sent``, once all accepted ones started (or 10 s on)."""
        wanted = {round(s.scheduled, 6) for s in sent if s.status == 202}
        deadline = time.monotonic() + 10
        while True:
            rows = [r for r in await conn.fetch(_ROWS, queue) if round(r["due"], 6) in wanted]
            if sum(1 for r in rows if r["started"]) >= len(wanted) or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.2)

    # The sampler connects before the warm-up: a new backend's start-up and first queries
    # delayed the first ~50 ms of a step by 20 ms (measured). It counts from the warm-up's end.
    seen: collections.Counter[str] = collections.Counter()
    watcher = await asyncpg.connect(asyncpg_dsn(c.database_url))
    sampler = asyncio.create_task(_sample(watcher, name, seen))
    port, path = c.port, "/v1/jobs"
    try:
        await started(
            await load.open_loop("127.0.0.1", port, path, body, rate, load.WARMUP_SECONDS)
        )
        api_cpu, worker_cpu = _cpu(api), _cpu(workers)
        commits = await _commits(conn, name)
        seen.clear()
        sent = await load.open_loop("127.0.0.1", port, path, body, rate, seconds)
        rows = await started(sent)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await watcher.close()
    lag = [(s.written - s.scheduled) * 1000 for s in sent if s.written]
    jobs = max(1, len(rows))
    samples = sum(seen.values()) or 1
    return {
        "rate": rate,
        "sent": len(sent),
        "started": sum(1 for r in rows if r["started"]),
        **_split(list(rows)),
        "submitter_lag_p50_ms": percentile(lag, 50) if lag else 0.0,
        "submitter_lag_p99_ms": percentile(lag, 99) if lag else 0.0,
        "worker_cpu_ms_per_job": (_cpu(workers) - worker_cpu) * 1000 / jobs,
        "api_cpu_ms_per_job": (_cpu(api) - api_cpu) * 1000 / jobs,
        "commits_per_job": (await _commits(conn, name) - commits) / jobs,
        "postgres_busy": {k: round(v / samples, 3) for k, v in seen.most_common(8)},
    }


def report(figures: dict[str, Any]) -> None:
    print(
        f"{figures['rate']:,.0f}/s ({figures['started']}/{figures['sent']} started): "
        f"due→created p50 {figures['due_created_p50_ms']:.1f} p99 "
        f"{figures['due_created_p99_ms']:.1f} ms | created→started p50 "
        f"{figures['created_started_p50_ms']:.1f} p99 {figures['created_started_p99_ms']:.1f} ms"
        f" | total p50 {figures['total_p50_ms']:.1f} p99 {figures['total_p99_ms']:.1f} ms",
        flush=True,
    )
    print(
        f"   the submitter's own lag (due → request written), in every figure above: p50 "
        f"{figures['submitter_lag_p50_ms']:.2f} p99 {figures['submitter_lag_p99_ms']:.2f} ms",
        flush=True,
    )
    print(
        f"   CPU per job: worker {figures['worker_cpu_ms_per_job']:.3f} ms, API "
        f"{figures['api_cpu_ms_per_job']:.3f} ms; Postgres commits per job "
        f"{figures['commits_per_job']:.2f}",
        flush=True,
    )
    busy = ", ".join(f"{k} {v:.0%}" for k, v in figures["postgres_busy"].items())
    print(f"   Postgres client backends, share of busy samples: {busy or 'none'}", flush=True)


async def run(args: argparse.Namespace, server: str, redis_url: str) -> list[dict[str, Any]]:
    from app.db.migrate import upgrade

    name = f"bench_latency_{uuid.uuid4().hex[:8]}"
    await infra.create_database(server, name)
    database_url = infra.with_database(server, name)
    log_dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-latency-"))
    procs = infra.Processes(log_dir)
    c = Conveyor(procs, database_url, redis_url, args.concurrency)
    results: list[dict[str, Any]] = []
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await asyncio.to_thread(upgrade, database_url)
        await c.start_api(args.api_workers)
        queues = [f"lat-{i}" for i in range(len(args.rates))]
        workers = c.start_workers(queues, 1)
        await c.ready(queues[:1])
        for queue, rate in zip(queues, args.rates, strict=True):
            figures = await step(c, workers, conn, name, queue, rate, args.seconds)
            report(figures)
            results.append(figures)
    finally:
        await conn.close()
        procs.stop_all()
        await infra.delete_keys(redis_url, f"{c.prefix}*")
        await infra.drop_database(server, name)
        shutil.rmtree(log_dir, ignore_errors=True)
    return results


async def main(args: argparse.Namespace) -> None:
    with infra.servers() as (server, redis_url):
        results = await run(args, server, redis_url)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rates", default="200,1000", help="offered jobs/s, one step each")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each step")
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64, help="the worker's --concurrency")
    p.add_argument("--smoke", action="store_true", help="one short step, for the tests")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.smoke:
        args.rates, args.seconds, args.api_workers = "50", 1.0, 1
    args.rates = [float(x) for x in str(args.rates).split(",") if x.strip()]
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
