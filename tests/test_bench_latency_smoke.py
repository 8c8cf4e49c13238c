"""``scripts/bench_latency.py --smoke`` runs end to end and prints every figure, so the
benchmark cannot rot. It checks that every job sent was started and that each figure is
there and consistent (the two halves of the latency add up to the whole), not how fast
anything is (the real run's figures are in docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Backends
from tests.support.scripts import run_script


@pytest.mark.serial  # a load that would starve a test beside it
@pytest.mark.timeout(150)
def test_bench_latency_smoke(backends: Backends, tmp_path: Path) -> None:
    env = {
        "CONVEYOR_TEST_DATABASE_URL": backends.database_url,  # its server, another database
        "CONVEYOR_TEST_REDIS_URL": backends.redis_url,
    }
    out = tmp_path / "latency.json"
    proc = run_script("bench_latency.py", "--smoke", "--json", str(out), timeout=140, env=env)
    assert "created→started" in proc.stdout and "Postgres client backends" in proc.stdout
    (step,) = json.loads(out.read_text())
    assert step["sent"] == step["started"] == 50
    assert 0 < step["due_created_p50_ms"] < step["total_p50_ms"]
    assert 0 < step["created_started_p50_ms"] < step["total_p50_ms"]
    assert step["worker_cpu_ms_per_job"] > 0 and step["api_cpu_ms_per_job"] > 0
    assert step["commits_per_job"] >= 2  # at least the insert and the claim of each job
    assert step["postgres_busy"] and abs(sum(step["postgres_busy"].values()) - 1) < 0.05
