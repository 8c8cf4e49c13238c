#!/usr/bin/env python
"""The inputs of the capacity model (docs/scaling.md), measured on this machine.

    .venv/bin/python scripts/bench_capacity.py [--seconds 8] [--concurrency 64] \
        [--rounds 1x1,2x1,2x4]

Starts a PostgreSQL and a Redis-compatible server of its own (the embedded wheels of
``conveyor dev``, in a temporary directory), so that the WAL position, the table statistics and
Redis' command counts and CPU time are this run's alone. Each round (``PxQ``: P worker
processes, Q partitions) runs the whole life of the no-op jobs it submits:

1. **submit**: one ``conveyor api`` process; ``demo.echo`` jobs are POSTed one per request
   for ``--seconds`` by ``wrk`` over ``--concurrency`` connections (a Python loop when wrk is
   missing; no worker runs): accepted jobs/s and the API's CPU per job;
2. **run**: ``conveyor worker --processes P --concurrency 64`` drains them: jobs/s from the
   first start to the last finish (Postgres' ``started_at``/``finished_at``), and the
   workers' CPU per job;
3. with every process stopped (their statistics flushed): Postgres' WAL bytes per job
   (``pg_current_wal_lsn()`` before and after each phase), rows inserted/updated per job
   (``pg_stat_user_tables``), heap and B-tree index entries written per job (WAL records
   counted with ``pg_walinspect``: every table, the maintenance loops' writes included),
   table+index bytes per job, server CPU per job; Redis' commands per job
   (``INFO commandstats``) and its CPU per job (``used_cpu_*``).

Plus a ceiling: entries/s through a bare Redis Stream consumer group on one node (XADD,
XREADGROUP of 500, XACK + XDEL; no Postgres). The client, the servers and the processes all
share the machine's cores, so the rates are a floor; CPU per job is the figure to scale with.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_drain import bare_stream
from benchmark.load import have_wrk, wrk_post

from app.db.migrate import upgrade
from app.db.url import asyncpg_dsn
from app.devserver import EmbeddedPostgres, EmbeddedRedis
from app.settings import Settings
from tests.support.processes import Proc, Spawner

TABLES = ("jobs", "job_events")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants, living and reaped."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
        if proc is root:
            total += t.children_user + t.children_system
    return total


@dataclass
class PgState:
    lsn: str
    stats: dict[str, dict[str, int]]
    size: int
    cpu: float


async def pg_state(url: str, postmaster: int) -> PgState:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        rows = await conn.fetch(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del"
            " FROM pg_stat_user_tables WHERE relname = ANY($1::text[])",
            list(TABLES),
        )
        size = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(c)) FROM unnest($1::regclass[]) AS c",
            list(TABLES),
        )
    finally:
        await conn.close()
    stats = {r["relname"]: {k: int(v) for k, v in r.items() if k != "relname"} for r in rows}
    return PgState(lsn, stats, int(size), cpu_seconds(postmaster))


async def wal_bytes(url: str, before: str, after: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        diff = await conn.fetchval(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)", after, before
        )
        return int(diff)
    finally:
        await conn.close()


async def wal_records(url: str, before: str, after: str) -> dict[str, tuple[int, int]]:
    """WAL records between two positions by ``resource manager/record type``: (count,
    full-page-image bytes), read with pg_walinspect."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        rows = await conn.fetch(
            'SELECT "resource_manager/record_type" AS kind, count, fpi_size'
            " FROM pg_get_wal_stats($1::text::pg_lsn, $2::text::pg_lsn, true)",
            before,
            after,
        )
    finally:
        await conn.close()
    return {r["kind"]: (int(r["count"]), int(r["fpi_size"])) for r in rows}


async def redis_state(url: str) -> tuple[int, float]:
    """(commands served, CPU seconds) of the Redis server so far."""
    async with Redis.from_url(url) as redis:
        commands: dict[str, Any] = await redis.info("commandstats")
        cpu: dict[str, Any] = await redis.info("cpu")
    calls = sum(int(v["calls"]) for v in commands.values() if isinstance(v, dict))
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def submit_singly(url: str, queue: str, seconds: float, concurrency: int) -> float:
    """POST one job per request for ``seconds`` from ``concurrency`` connections; returns the
    accepted requests per second."""
    body = {"type": "demo.echo", "queue": queue, "payload": {"n": 1}}
    if have_wrk():
        result = await asyncio.to_thread(wrk_post, f"{url}/v1/jobs", body, seconds, concurrency)
        return result.rate
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    accepted = 0
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        end = time.perf_counter() + seconds

        async def lane() -> None:
            nonlocal accepted
            while time.perf_counter() < end:
                if (await client.post("/v1/jobs", json=body)).status_code == 202:
                    accepted += 1

        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return accepted / (time.perf_counter() - began)


async def count_jobs(url: str, queue: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE queue = $1", queue))
    finally:
        await conn.close()


async def drained(url: str, queue: str, jobs: int, timeout: float = 600.0) -> float:
    """Wait until every job succeeded; jobs/s from the first start to the last finish."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        deadline = time.monotonic() + timeout
        sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'succeeded'"
        while await conn.fetchval(sql, queue) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not drain the queue in time")
            await asyncio.sleep(0.2)
        span = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs"
            " WHERE queue = $1",
            queue,
        )
        return jobs / float(span)
    finally:
        await conn.close()


@dataclass
class Round:
    processes: int
    partitions: int
    figures: dict[str, float]


class Bench:
    def __init__(self, pg: EmbeddedPostgres, redis: EmbeddedRedis, args: argparse.Namespace):
        self.pg = pg
        self.redis = redis
        self.database_url = pg.url
        self.args = args
        self.logdir = Path(tempfile.mkdtemp(prefix="conveyor-capacity-"))

    def settings(self, partitions: int) -> Settings:
        return Settings(
            database_url=self.database_url,
            redis_url=self.redis.url,
            redis_prefix=f"cap-{uuid.uuid4().hex[:8]}",
            partitions=partitions,
            log_level="WARNING",
            allowed_hosts="127.0.0.1,localhost",
        )

    async def _stop(self, procs: list[Proc]) -> None:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 30) for p in procs))
        await asyncio.sleep(1.0)  # let the server count the ended backends' statistics

    async def round(self, processes: int, partitions: int) -> Round:
        url, postmaster = self.database_url, self.pg.pid or 0
        conn = await asyncpg.connect(asyncpg_dsn(url))
        await conn.execute("DELETE FROM conveyor_state WHERE key = 'stream-layout'")
        await conn.close()
        settings = self.settings(partitions)
        spawn = Spawner(settings, self.logdir)
        queue = f"cap-{processes}x{partitions}"
        api, api_url = spawn.api()
        r0, pg0 = await redis_state(self.redis.url), await pg_state(url, postmaster)
        api_cpu = cpu_seconds(api.pid)
        submit_rate = await submit_singly(api_url, queue, self.args.seconds, self.args.concurrency)
        api_cpu = cpu_seconds(api.pid) - api_cpu
        jobs = await count_jobs(url, queue)
        pg1 = await pg_state(url, postmaster)
        await self._stop([api])
        worker = spawn.worker([queue], concurrency=64, processes=processes)
        run_rate = await drained(url, queue, jobs)
        worker_cpu = cpu_seconds(worker.pid)
        pg2_lsn = (await pg_state(url, postmaster)).lsn
        await self._stop([worker])
        r2, pg2 = await redis_state(self.redis.url), await pg_state(url, postmaster)
        records = await wal_records(url, pg0.lsn, pg2.lsn)

        def count(prefix: str) -> float:
            return sum(n for kind, (n, _) in records.items() if kind.startswith(prefix)) / jobs

        per = {
            "submit_jobs_s_one_api_process": submit_rate,
            "api_cpu_ms_per_job": api_cpu / jobs * 1000,
            "run_jobs_s": run_rate,
            "worker_cpu_ms_per_job": worker_cpu / jobs * 1000,
            "wal_bytes_per_job_submit": await wal_bytes(url, pg0.lsn, pg1.lsn) / jobs,
            "wal_bytes_per_job_run": await wal_bytes(url, pg1.lsn, pg2_lsn) / jobs,
            "postgres_cpu_ms_per_job": (pg2.cpu - pg0.cpu) / jobs * 1000,
            "table_and_index_bytes_per_job": (pg2.size - pg0.size) / jobs,
            "redis_commands_per_job": (r2[0] - r0[0]) / jobs,
            "redis_cpu_us_per_job": (r2[1] - r0[1]) / jobs * 1e6,
        }
        for table in TABLES:
            before, after = pg0.stats.get(table, {}), pg2.stats[table]
            delta = {k: after[k] - before.get(k, 0) for k in after}
            per[f"{table}_rows_inserted_per_job"] = delta["n_tup_ins"] / jobs
            per[f"{table}_rows_updated_per_job"] = delta["n_tup_upd"] / jobs
            per[f"{table}_hot_updates_per_job"] = delta["n_tup_hot_upd"] / jobs
        per["wal_heap_inserts_per_job"] = count("Heap/INSERT") + count("Heap2/MULTI_INSERT")
        per["wal_heap_updates_per_job"] = count("Heap/UPDATE") + count("Heap/HOT_UPDATE")
        per["wal_btree_entries_per_job"] = count("Btree/INSERT") + count("Btree/SPLIT")
        per["wal_full_page_image_bytes_per_job"] = sum(f for _, f in records.values()) / jobs
        per["jobs"] = jobs
        return Round(processes, partitions, per)


def _rounds(text: str) -> list[tuple[int, int]]:
    pairs = [part.split("x") for part in text.split(",") if part]
    return [(int(p), int(q)) for p, q in pairs]


def _report(rounds: list[Round], bare: float, version: str, seconds: float) -> None:
    print(f"# {version}; {psutil.cpu_count()} cores; load average {psutil.getloadavg()}")
    print(f"# {seconds:g} s of single POSTs per round; rounds: worker processes x partitions")
    print(f"bare_stream_entries_s_one_redis_node: {bare:,.0f}")
    names = list(rounds[0].figures)
    header = "figure".ljust(44) + "".join(f"{r.processes}x{r.partitions}".rjust(12) for r in rounds)
    print(header)
    for name in names:
        values = [r.figures[name] for r in rounds]
        print(name.ljust(44) + "".join(f"{v:12,.2f}" for v in values))
    if len(rounds) > 1:
        print("# median over the rounds, the figures that do not depend on the layout:")
        for name in names:
            if "jobs_s" not in name:
                print(f"{name}: {statistics.median(r.figures[name] for r in rounds):,.2f}")


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-capacity-servers-"))
    pg = EmbeddedPostgres(workdir / "postgres")
    redis = EmbeddedRedis(workdir / "redis", persistent=False)
    url = await asyncio.to_thread(pg.start)
    redis.start()
    try:
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        version = str(await conn.fetchval("SELECT version()")).split(" on ")[0]
        await conn.close()
        bench = Bench(pg, redis, args)
        rounds = [await bench.round(p, q) for p, q in _rounds(args.rounds)]
        bare = await bare_stream(redis.url, args.bare)
        _report(rounds, bare, version, args.seconds)
    finally:
        redis.stop()
        pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="of single POSTs a round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", default="1x1,2x1,2x4", help="PxQ,...: processes x partitions")
    parser.add_argument("--bare", type=int, default=100000, help="entries of the bare ceiling")
    asyncio.run(main(parser.parse_args()))
