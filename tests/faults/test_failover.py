"""A PostgreSQL failover while jobs flow (issue 15), on a primary and a streaming replica that
the test makes itself (``initdb``, ``pg_basebackup -R``; loopback ports; never the shared
server).

Replication is asynchronous, so the test opens a loss window on purpose: it cuts the replica off
(its ``primary_conninfo`` emptied), lets the primary accept jobs for a while, kills the primary
and promotes the replica; the API and the workers are restarted with the replica's URL, and the
load's producers retry what got no answer. Jobs the old primary answered 2xx during the cut are
the documented, measured loss (synchronous replication closes it: docs/guarantees.md). Nothing
else may go wrong: no job left queued or running, none terminal twice, entries in Redis for jobs
the new primary never heard of dropped without error, and the switch (system identifier,
timeline) detected and reconciled. To make the reconcile necessary, the workers are stopped
(SIGSTOP) before the cut while jobs pile up dispatched, and resumed after it: they run those jobs
on the old primary only and ack their entries, so the new primary holds them queued and marked
dispatched with no entry left; the entry check is set to an hour, so only the switch's
re-dispatch can send them again.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from redis.asyncio import Redis

from app.db.migrate import upgrade
from app.devserver import EmbeddedRedis
from app.settings import Settings
from app.streams.keys import Keys
from tests.faults.checker import TERMINAL, check, drain, open_jobs, publish
from tests.faults.conftest import fault_settings
from tests.faults.harness import Ledger, LoadGenerator, create_effects_table, effect_body
from tests.support import db
from tests.support.processes import Proc, Spawner
from tests.support.replication import Replicated, server_binaries

pytestmark = pytest.mark.skipif(
    server_binaries() is None,
    reason="the failover test needs the PostgreSQL server binaries (initdb, pg_ctl,"
    " pg_basebackup, postgres) under /usr/lib/postgresql/*/bin (Debian's postgresql package)",
)

JOBS = 300
RATE = 30.0
CUT_SECONDS = 1.5  # the primary accepts jobs the replica never sees for this long
PARTITIONS = 2


@pytest.fixture
def pair() -> Iterator[Replicated]:
    bindir = server_binaries()
    assert bindir is not None
    found = Replicated(bindir)
    try:
        found.start_primary()
        asyncio.run(db.execute(found.primary.url(), "CREATE DATABASE conveyor"))
        upgrade(found.primary.url("conveyor"))
        asyncio.run(create_effects_table(found.primary.url("conveyor")))
        found.add_replica()
        yield found
    finally:
        found.stop()


@pytest.fixture
def settings(pair: Replicated, fault_redis: EmbeddedRedis) -> Settings:
    return fault_settings(
        pair.primary.url("conveyor"),
        fault_redis.url,
        partitions=PARTITIONS,
        dispatch_check_seconds=3600.0,  # not the backstop: the switch must be noticed
    )


def _spawn_workers(spawn: Spawner, settings: Settings, queue: str, tag: str) -> list[Proc]:
    return [spawn.worker([queue], name=f"{queue}-{tag}{i}", settings=settings) for i in range(2)]


async def _registered(settings: Settings, prefix: str) -> None:
    sql = "SELECT count(*) FROM workers WHERE starts_with(name, $1)"
    await db.wait_for_value(settings.database_url, sql, prefix, expected=2, timeout=60.0)


async def _marked_queued(url: str, queue: str) -> set[UUID]:
    rows = await db.fetch(
        url,
        "SELECT id FROM jobs WHERE queue = $1 AND status = 'queued' AND dispatched_at IS NOT NULL",
        queue,
    )
    return {r["id"] for r in rows}


async def _cut_replication(pair: Replicated) -> None:
    """Stop streaming to the replica (its WAL receiver ends; it keeps serving reads)."""
    url = pair.replica.url()
    await db.execute(url, "ALTER SYSTEM SET primary_conninfo = ''")
    await db.execute(url, "SELECT pg_reload_conf()")
    sql = "SELECT count(*) FROM pg_stat_wal_receiver"
    await db.wait_for_value(url, sql, expected=0, timeout=20.0)


async def _streams_empty(settings: Settings, queue: str, timeout: float = 45.0) -> int:
    """Wait until the queue's streams hold no entry; returns what is left."""
    streams = Keys(settings.redis_prefix).queue_streams(queue, settings.partitions)
    async with Redis.from_url(settings.redis_url) as redis:
        deadline = time.monotonic() + timeout
        while True:
            left = sum([await redis.xlen(s) for s in streams])
            if left == 0 or time.monotonic() > deadline:
                return int(left)
            await asyncio.sleep(0.25)


def _bodies(queue: str) -> list[dict[str, Any]]:
    rng = random.Random(16)
    flaky = {
        "type": "demo.fail",
        "queue": queue,
        "payload": {"fail_times": 1},
        "max_attempts": 5,
    }
    bodies = [effect_body(queue, rng) for _ in range(JOBS - 40)] + [flaky] * 40
    rng.shuffle(bodies)
    return bodies


@pytest.mark.serial  # two Postgres servers and their processes; times a cut in seconds
async def test_promoting_the_replica_while_jobs_flow(
    spawn: Spawner, settings: Settings, pair: Replicated, queue: str, results: Path
) -> None:
    _, url = spawn.api()
    old = _spawn_workers(spawn, settings, queue, "old")
    await _registered(settings, f"{queue}-old")
    ledger = Ledger()
    gen = LoadGenerator(ledger, url, deadline=90.0)
    load = asyncio.create_task(gen.run(_bodies(queue), RATE))
    await gen.reached(JOBS * 0.3)

    # Jobs pile up dispatched while the workers are stopped; the replica sees them so.
    for proc in old:
        proc.signal(signal.SIGSTOP)
    await asyncio.sleep(1.0)
    replica_url = pair.replica.url("conveyor")
    stranded: set[UUID] = set()
    for _ in range(100):
        stranded = await _marked_queued(replica_url, queue)
        if stranded and stranded <= await _marked_queued(settings.database_url, queue):
            break
        await asyncio.sleep(0.05)
    cut_at = time.time()
    await _cut_replication(pair)
    for proc in old:
        proc.signal(signal.SIGCONT)  # they run the piled-up jobs on the old primary only
    await asyncio.sleep(CUT_SECONDS)
    killed_at = time.time()
    await asyncio.to_thread(pair.primary.stop, "immediate")
    await asyncio.to_thread(pair.replica.promote)
    promoted_at = time.time()

    # The old processes die with their primary's host (SIGKILL); new ones start on the replica.
    new = settings.model_copy(update={"database_url": replica_url})
    for proc in list(spawn.procs):
        proc.signal(signal.SIGKILL)
    workers = _spawn_workers(spawn, new, queue, "new")
    _, gen.base_url = await asyncio.to_thread(spawn.api, settings=new)  # the retries go there
    await _registered(new, f"{queue}-new")
    serving_at = time.time()
    await load
    drained = await drain(replica_url, queue, timeout=60.0)
    left_in_streams = await _streams_empty(new, queue)
    report = await check("postgres_failover", replica_url, queue, ledger)
    identity = await db.fetchval(
        replica_url, "SELECT value FROM conveyor_state WHERE key = 'postgres-identity'"
    )
    for proc in workers:
        await asyncio.to_thread(proc.stop, 15)

    lost = {i: s for i, s in ledger.ok().items() if i not in report.snap.jobs}
    answered = [s.completed or 0.0 for s in lost.values()]
    report.extra.update(
        loss_window_jobs=len(lost),
        loss_window_s=f"{killed_at - cut_at:.2f}",
        lost_answered_s=(
            f"{min(answered) - cut_at:+.2f}..{max(answered) - cut_at:+.2f}" if lost else "-"
        ),
        stranded_at_cut=len(stranded),
        outage_s=f"{serving_at - killed_at:.1f}",
        promote_s=f"{promoted_at - killed_at:.1f}",
        drain_s=f"{drained:.1f}",
        left_in_streams=left_in_streams,
    )
    publish(report, results)

    # The loss window, and only it: every job lost was answered after replication was cut.
    assert lost, "no job was accepted during the cut: the loss window was not exercised"
    early = [i for i, s in lost.items() if (s.completed or 0.0) < cut_at - 1.0]
    assert not early, f"jobs answered before the cut are missing: {early[:5]}"
    not_lost = set(report.lost) - set(lost)
    assert not not_lost, f"jobs the new primary has but never finished: {sorted(not_lost)[:5]}"
    assert await open_jobs(replica_url, queue) == 0, report.statuses
    assert not report.dup_terminal, report.dup_terminal[:5]
    assert not report.dup_submit, report.dup_submit[:5]
    assert set(report.statuses) <= TERMINAL and "dead" not in report.statuses
    # The jobs stranded by the lost claims ran again on the new primary.
    assert stranded, "no job was dispatched and waiting at the cut"
    finished = {i for i, r in report.snap.jobs.items() if r["status"] == "succeeded"}
    assert stranded <= finished, sorted(stranded - finished)[:5]
    # The switch was seen (same system, the next timeline) and reconciled.
    assert identity is not None and identity.endswith(":2"), identity
    logs = "".join(p.output() for p in workers)
    assert "PostgreSQL server changed" in logs
    assert "Traceback (most recent call last)" not in logs, logs[-4000:]
    # Entries of jobs the new primary never knew were dropped.
    assert left_in_streams == 0
