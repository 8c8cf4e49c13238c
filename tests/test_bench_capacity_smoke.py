"""``scripts/bench_capacity.py`` runs end to end on servers of its own and prints every input
of the capacity model (docs/scaling.md), so the benchmark cannot rot. It checks that the
figures are there and plausible (a job writes its row and its three events), not how fast
anything is."""

from __future__ import annotations

import re

import pytest

from tests.support.scripts import run_script


@pytest.mark.timeout(150)
@pytest.mark.serial  # a load that would starve a test beside it
def test_bench_capacity_smoke() -> None:
    args = ("--seconds", "1", "--rounds", "1x1", "--bare", "1000")
    proc = run_script("bench_capacity.py", *args, timeout=140)
    figures = {
        m.group(1): float(m.group(2).replace(",", ""))
        for m in re.finditer(r"^(\w+)\s+([\d,.]+)$", proc.stdout, re.MULTILINE)
    }
    assert figures["jobs"] > 0, proc.stdout
    for name in ("submit_jobs_s_one_api_process", "run_jobs_s", "api_cpu_ms_per_job"):
        assert figures[name] > 0, name
    assert figures["wal_bytes_per_job_run"] > 0 and figures["redis_commands_per_job"] > 0
    assert figures["jobs_rows_inserted_per_job"] == pytest.approx(1.0, abs=0.1)
    assert figures["job_events_rows_inserted_per_job"] == pytest.approx(3.0, abs=0.3)
    assert figures["wal_btree_entries_per_job"] > 4
    assert "bare_stream_entries_s_one_redis_node:" in proc.stdout
