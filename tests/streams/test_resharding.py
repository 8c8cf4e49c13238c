"""Redis Cluster resharding while jobs flow (issue 15): one partition's slot moves to another
master, key by key (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE, what ``redis-cli --cluster
reshard`` does), while an API process submits and two workers run jobs. No job is lost, none
ends twice, and delivery of the moved partition stalls for a few seconds at most.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.streams.keys import Keys, partition_for
from tests.conftest import Backends, make_settings
from tests.faults.checker import check, drain, publish
from tests.faults.harness import Fault, Ledger, LoadGenerator, create_effects_table, effect_body
from tests.support import db
from tests.support.cluster import Cluster, slot_of
from tests.support.processes import Spawner

PARTITIONS = 4
JOBS = 480
RATE = 40.0  # per second: 12 s of load
STALL_LIMIT_S = 10.0  # generous for a loaded 2-core machine; a quiet one measures ~1-2 s


def _settings(backends: Backends, cluster: Cluster) -> Settings:
    return make_settings(
        backends,
        redis_url=f"redis://127.0.0.1:{cluster.ports[0]}/0",
        redis_cluster=True,
        partitions=PARTITIONS,
        reconcile_seconds=1.0,
        log_level="INFO",
    )


def max_gap(times: list[float], start: float, end: float) -> float:
    """The longest time between consecutive ``times`` within [start, end], edges included."""
    inside = sorted(t for t in times if start <= t <= end)
    points = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(points))


async def _move_under_load(
    gen: LoadGenerator, bodies: list[dict[str, Any]], cluster: Cluster, slot: int, target: int
) -> tuple[float, float, int]:
    """Submit ``bodies``; once 30 % have gone, move ``slot`` to ``target`` (key by key, half a
    second apart). Returns when the move began and ended, and how many keys it moved."""
    load = asyncio.create_task(gen.run(bodies, RATE))
    await gen.reached(len(bodies) * 0.3)
    began = time.time()
    moved = await asyncio.to_thread(cluster.move_slot, slot, target, pause=0.5)
    ended = time.time()
    await load
    return began, ended, moved


@pytest.mark.serial  # measures a stall in seconds
async def test_moving_a_partition_slot_loses_no_job_and_stalls_briefly(
    backends: Backends, cluster: Cluster, tmp_path: Path, queue: str, results: Path
) -> None:
    settings = _settings(backends, cluster)
    keys = Keys(settings.redis_prefix)
    node = cluster.node(0)
    slots = [slot_of(node, keys.epoch(queue, p)) for p in range(PARTITIONS)]
    moved = next((p for p, s in enumerate(slots) if cluster.owner(s) == 0), 0)
    slot = slots[moved]
    source = cluster.owner(slot)
    target = (source + 1) % len(cluster.ports)

    await create_effects_table(settings.database_url)
    spawn = Spawner(settings, tmp_path)
    try:
        _, url = spawn.api()
        [spawn.worker([queue], name=f"{queue}-w{i}") for i in range(2)]
        sql = "SELECT count(*) FROM workers WHERE starts_with(name, $1)"
        await db.wait_for_value(settings.database_url, sql, queue, expected=2, timeout=60.0)
        ledger = Ledger()
        gen = LoadGenerator(ledger, url)
        rng = random.Random(23)
        bodies = [effect_body(queue, rng) for _ in range(JOBS)]
        began, ended, keys_moved = await _move_under_load(gen, bodies, cluster, slot, target)
        drained = await drain(settings.database_url, queue, timeout=60.0)
        report = await check(
            "redis_reshard", settings.database_url, queue, ledger, [Fault(began, "reshard")]
        )
    finally:
        spawn.stop_all()

    assert cluster.owner(slot) == target
    starts = {
        job_id: [e.at for e in events if e.event == "claimed"]
        for job_id, events in report.snap.history.items()
    }
    moved_starts = [
        t for i, ts in starts.items() if partition_for(i, PARTITIONS) == moved for t in ts
    ]
    all_starts = [t for ts in starts.values() for t in ts]
    window = (began - 1.0, ended + 3.0)  # the load goes on well past it
    stall = max_gap(moved_starts, *window)
    report.extra.update(
        partition_stall_s=f"{stall:.2f}",
        any_stall_s=f"{max_gap(all_starts, *window):.2f}",
        move_s=f"{ended - began:.2f}",
        keys_moved=keys_moved,
        drain_s=f"{drained:.1f}",
    )
    publish(report, results)
    report.assert_clean()
    assert report.jobs == JOBS, (ledger.statuses, ledger.errors)
    assert report.statuses == {"succeeded": JOBS}
    assert keys_moved >= 1
    assert stall < STALL_LIMIT_S, report.line()
    for proc in spawn.procs:  # redirections and TRYAGAIN are retried, or logged as such
        log = proc.output()
        for sign in ("Traceback (most recent call last)", "AttributeError", "RuntimeError"):
            assert sign not in log, f"{proc.name}: {sign}\n{log[-4000:]}"
