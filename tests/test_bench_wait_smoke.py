"""``scripts/bench_wait.py --smoke`` runs end to end against real ``conveyor api`` and
``conveyor worker`` processes and prints every figure, so the benchmark cannot rot. It checks
that every wait was answered with the finished job and that the relay saw the API's
statements, not how fast anything is (the real run's figures are in docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from app.db.url import asyncpg_dsn
from tests.conftest import Backends
from tests.support.scripts import run_script


@pytest.mark.serial  # a load that would starve a test beside it
@pytest.mark.timeout(150)
async def test_bench_wait_smoke(backends: Backends, tmp_path: Path) -> None:
    env = {
        "CONVEYOR_TEST_DATABASE_URL": backends.database_url,
        "CONVEYOR_TEST_REDIS_URL": backends.redis_url,
    }
    out = tmp_path / "wait.json"
    proc = run_script("bench_wait.py", "--smoke", "--json", str(out), timeout=140, env=env)
    assert "| submission → answer (?wait=) |" in proc.stdout
    assert "| submission → finished_at (baseline) |" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["jobs"] == 10 and figures["answers"] == 10
    assert figures["not_finished"] == 0
    for key in ("latency_ms", "baseline_ms", "late_ms", "ratio"):
        assert figures[key]["p50"] > 0, key
    # The relay carried the API's statements: the batch submit's insert at least.
    assert figures["statements_round"][0] > figures["statements_waiting"][0] >= 0

    conn = await asyncpg.connect(asyncpg_dsn(backends.database_url))
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", figures["database"]
        )
    finally:
        await conn.close()
    redis = Redis.from_url(backends.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{figures['redis_prefix']}*")]
    finally:
        await redis.aclose()
    assert left == 0
    assert keys == []
