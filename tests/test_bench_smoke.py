"""``scripts/bench.py --smoke`` runs end to end and writes its figures, so the benchmark
cannot rot. It checks that every workload produced a figure, not how fast anything is."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from app.db.url import asyncpg_dsn as _dsn
from tests.conftest import Backends
from tests.support.scripts import run_script


@pytest.mark.serial  # a load that would starve a test beside it
@pytest.mark.timeout(280)
async def test_bench_smoke_writes_every_figure(backends: Backends, tmp_path: Path) -> None:
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    env = {
        "CONVEYOR_TEST_DATABASE_URL": backends.database_url,
        "CONVEYOR_TEST_REDIS_URL": backends.redis_url,
    }
    args = ("--smoke", "--out", str(tmp_path), "--name", name)
    proc = run_script("bench.py", *args, timeout=260, env=env)
    assert "| figure | Conveyor | other |" in proc.stdout

    result = json.loads((tmp_path / f"{name}.json").read_text())
    conveyor = {f["metric"]: f for f in result["figures"] if f["system"] == "conveyor"}
    for metric in (
        "single POST, 64 connections: req/s",
        "API CPU per accepted POST",
        "drain no-op jobs, 1 worker process",
        "batch submit (1000 per request)",
        "submit→start at 50/s: p99",
        "knee: highest offered rate with p99 ≤ 100 ms",
        "worker RSS after the drain",
        "API RSS",
    ):
        assert metric in conveyor, metric
    for metric in ("drain no-op jobs, 1 worker process", "batch submit (1000 per request)"):
        assert conveyor[metric]["median"] > 0, conveyor[metric]
    assert any(f["system"] == "fastapi" for f in result["figures"])
    assert result["latency_curves"]["conveyor"]["50.0"]
    if (tmp_path / f"{name}.png").exists():
        assert (tmp_path / f"{name}.png").stat().st_size > 1000

    # Peers that are installed ran too; the run left no database and no key behind.
    for peer, module in (
        ("pgqueuer", "pgqueuer"),
        ("taskiq", "taskiq_redis"),
        ("dramatiq", "dramatiq"),
    ):
        try:
            __import__(module)
        except ImportError:
            continue
        assert any(f["system"].startswith(peer) for f in result["figures"]), peer
    removed = result["settings"]["removed"]
    assert removed["databases"] and removed["redis"]
    conn = await asyncpg.connect(_dsn(backends.database_url))
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1)", removed["databases"]
        )
    finally:
        await conn.close()
    redis = Redis.from_url(backends.redis_url)
    try:
        keys = [k for p in removed["redis"] async for k in redis.scan_iter(match=p, count=1000)]
    finally:
        await redis.aclose()
    assert left == 0
    assert keys == []
