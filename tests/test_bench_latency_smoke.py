"""``scripts/bench_latency.py --smoke`` runs end to end and prints every figure, so the
benchmark cannot rot. It checks that every job sent was started and that each figure is
there and consistent (the two halves of the latency add up to the whole), not how fast
anything is (the real run's figures are in docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Backends

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.serial  # a load that would starve a test beside it
@pytest.mark.timeout(150)
def test_bench_latency_smoke(backends: Backends, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_TEST_DATABASE_URL"] = backends.database_url  # its server, another database
    env["CONVEYOR_TEST_REDIS_URL"] = backends.redis_url
    out = tmp_path / "latency.json"
    cmd = [sys.executable, "scripts/bench_latency.py", "--smoke", "--json", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "created→started" in proc.stdout and "Postgres client backends" in proc.stdout
    (step,) = json.loads(out.read_text())
    assert step["sent"] == step["started"] == 50
    assert 0 < step["due_created_p50_ms"] < step["total_p50_ms"]
    assert 0 < step["created_started_p50_ms"] < step["total_p50_ms"]
    assert step["worker_cpu_ms_per_job"] > 0 and step["api_cpu_ms_per_job"] > 0
    assert step["commits_per_job"] >= 2  # at least the insert and the claim of each job
    assert step["postgres_busy"] and abs(sum(step["postgres_busy"].values()) - 1) < 0.05
