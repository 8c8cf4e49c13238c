#!/usr/bin/env python
"""Throughput and latency benchmark. Prints figures, with ratios to baselines run alongside.

    .venv/bin/python scripts/bench.py [--jobs 20000] [--workers 1] [--concurrency 64]

Figures:
- drain: N no-op (demo.echo) jobs, every transition written to Postgres, drained by real
  worker processes; baseline: the same number of entries through a bare Redis Stream
  consumer group (XADD, XREADGROUP, XACK+XDEL) with no Postgres at all.
- submit: sequential POST /v1/jobs latency p50/p99 against a real API process; baseline:
  GET /healthz on the same process.
- batch submit: jobs/s through POST /v1/jobs/batch (1000 per request).

Uses CONVEYOR_TEST_DATABASE_URL / CONVEYOR_TEST_REDIS_URL (a throwaway database is created),
or starts embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade
from app.db.url import asyncpg_dsn, with_database
from app.devserver import EmbeddedPostgres, EmbeddedRedis, free_port


async def _db(server_url: str, name: str, create: bool) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        sql = f'CREATE DATABASE "{name}"' if create else f'DROP DATABASE "{name}" WITH (FORCE)'
        await conn.execute(sql)
    finally:
        await conn.close()


async def bare_stream(redis_url: str, n: int) -> float:
    """Entries per second through a consumer group with no Postgres: the floor of our cost."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    key = f"bench-{uuid.uuid4().hex[:8]}"
    await redis.xgroup_create(key, "g", id="0", mkstream=True)
    start = time.perf_counter()
    for i in range(0, n, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(1000, n - i)):
                pipe.xadd(key, {"job": str(uuid.uuid4())})
            await pipe.execute()
    done = 0
    while done < n:
        reply: Any = await redis.xreadgroup("g", "c", {key: ">"}, count=64)
        ids = [e for _, entries in reply for e, _ in entries]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(key, "g", *ids)
            pipe.xdel(key, *ids)
            await pipe.execute()
        done += len(ids)
    elapsed = time.perf_counter() - start
    await redis.delete(key)
    await redis.aclose()
    return n / elapsed


def _env(db: str, redis: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_DATABASE_URL=db,
        CONVEYOR_REDIS_URL=redis,
        CONVEYOR_REDIS_PREFIX=prefix,
        CONVEYOR_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    return env


async def _wait_http(url: str) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(300):
            try:
                if (await c.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("API did not start")


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def latency(url: str, queue: str, n: int) -> tuple[list[float], list[float]]:
    submit, health = [], []
    async with httpx.AsyncClient(base_url=url) as c:
        for _ in range(n):
            t = time.perf_counter()
            await c.get("/healthz")
            health.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = await c.post("/v1/jobs", json={"type": "demo.echo", "queue": queue, "payload": {}})
            submit.append(time.perf_counter() - t)
            assert r.status_code == 202, r.text
    return submit, health


async def batch_submit(url: str, queue: str, n: int) -> float:
    body = {
        "jobs": [{"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(1000)]
    }
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for _ in range(n // 1000):
            r = await c.post("/v1/jobs/batch", json=body)
            assert r.status_code == 202, r.text
    return (n // 1000) * 1000 / (time.perf_counter() - start)


async def drain(db_url: str, queue: str, n: int, timeout: float = 600) -> float:
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        first = await conn.fetchval("SELECT min(started_at) FROM jobs WHERE queue = $1", queue)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            left = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND status <> 'succeeded'", queue
            )
            if left == 0:
                break
            await asyncio.sleep(0.2)
        span = await conn.fetchrow(
            "SELECT min(started_at) AS a, max(finished_at) AS b, count(*) AS n"
            " FROM jobs WHERE queue = $1",
            queue,
        )
        del first
        seconds: float = (span["b"] - span["a"]).total_seconds()
        return float(span["n"]) / seconds
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    servers: list[EmbeddedPostgres | EmbeddedRedis] = []
    server = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if not server:
        pg = EmbeddedPostgres(tmp / "pg")
        server = pg.start()
        servers.append(pg)
    if not redis_url:
        rd = EmbeddedRedis(tmp / "redis", persistent=False)
        redis_url = rd.start()
        servers.append(rd)
    name = f"conveyor_bench_{uuid.uuid4().hex[:8]}"
    await _db(server, name, create=True)
    db_url = with_database(server, name)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await asyncio.to_thread(upgrade, db_url)
        env = _env(db_url, redis_url, f"bench-{uuid.uuid4().hex[:6]}")
        port = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", "api", "--port", str(port)], cwd=ROOT, env=env
            )
        )
        url = f"http://127.0.0.1:{port}"
        await _wait_http(url)

        floor = await bare_stream(redis_url, args.jobs)
        submit, health = await latency(url, "bench-latency", args.requests)
        # Workers start first (their first start records the Redis epoch), then the backlog
        # is submitted while they drain it.
        for i in range(args.workers):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "workers",
                        "--queues",
                        "bench-drain,bench-latency",
                        "--concurrency",
                        str(args.concurrency),
                        "--name",
                        f"bench-{i}",
                    ],
                    cwd=ROOT,
                    env=env,
                )
            )
        await asyncio.sleep(3)
        rate = await batch_submit(url, "bench-drain", args.jobs)
        drained = await drain(db_url, "bench-drain", args.jobs)

        print(f"bare stream (no Postgres) : {floor:10.0f} entries/s   (baseline)")
        print(
            f"worker drain, all in PG   : {drained:10.0f} jobs/s      "
            f"ratio to baseline {drained / floor:.3f}  "
            f"({args.workers} worker(s) x concurrency {args.concurrency})"
        )
        print(f"batch submit (1000/req)   : {rate:10.0f} jobs/s")
        print(
            f"GET /healthz p50/p99      : {_pct(health, 50) * 1000:7.2f} / "
            f"{_pct(health, 99) * 1000:7.2f} ms (baseline)"
        )
        print(
            f"POST /v1/jobs p50/p99     : {_pct(submit, 50) * 1000:7.2f} / "
            f"{_pct(submit, 99) * 1000:7.2f} ms  "
            f"ratio p50 {_pct(submit, 50) / _pct(health, 50):.1f}x"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        await _db(server, name, create=False)
        for s in servers:
            s.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
