"""``scripts/bench_retention.py --smoke`` runs end to end and prints every figure, so the
benchmark cannot rot. It checks that pruning deleted jobs and that the figures are there, not
how fast anything is (the real run's figures are in docs/performance.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import asyncpg
import pytest

from app.db.url import asyncpg_dsn
from tests.conftest import Backends
from tests.support.scripts import run_script


@pytest.mark.serial  # a load that would starve a test beside it
@pytest.mark.timeout(120)
async def test_bench_retention_smoke(backends: Backends, tmp_path: Path) -> None:
    out = tmp_path / "retention.json"
    env = {"CONVEYOR_TEST_DATABASE_URL": backends.database_url}
    proc = run_script("bench_retention.py", "--smoke", "--json", str(out), timeout=110, env=env)
    assert "prune rate:" in proc.stdout and "| p99 |" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["rows"] == 5_000 and figures["expired_at_start"] > 3_000
    assert figures["deleted"] > 0 and figures["prune_rate_per_s"] > 0
    for key in ("submit_p50_ms", "submit_p99_ms", "submit_p99_ms_pruning", "p99_ratio"):
        assert figures[key] > 0, key
    for plan in figures["plans"].values():  # rows are found through the index, never a scan
        indexes = set(re.findall(r"Index (?:Only )?Scan (?:using|on) (\w+)", plan))
        allowed = {"ix_jobs_finished", "pk_jobs", "ix_job_events_job"}  # events: by their job
        assert "ix_jobs_finished" in indexes and indexes <= allowed, plan
        assert "Seq Scan" not in plan, plan
    conn = await asyncpg.connect(asyncpg_dsn(backends.database_url))
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", figures["database"]
        )
    finally:
        await conn.close()
    assert left == 0
