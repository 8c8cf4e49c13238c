"""Many processes on one host (issue 15): two API processes and three worker processes (two of
them with ``--processes 2``, so five worker processes in all) serve one queue of four partitions.
A few hundred jobs, some failing before they succeed and some failing for good, are submitted
through both APIs; the ledger (``jobs`` and ``job_events``) must show every accepted job exactly
once in a terminal state, and every process must have taken part.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.devserver import EmbeddedRedis
from app.settings import Settings
from tests.conftest import Backends
from tests.faults.checker import TERMINAL, check, drain, publish
from tests.faults.conftest import fault_settings
from tests.faults.harness import Ledger, LoadGenerator, create_effects_table, effect_body
from tests.support import db
from tests.support.processes import Spawner

PARTITIONS = 4
EFFECTS = 240  # succeed at their first attempt
FLAKY = 60  # demo.fail: fail once or twice, then succeed
POISON = 12  # always fail: dead after two attempts


@pytest.fixture
def settings(backends: Backends, fault_redis: EmbeddedRedis) -> Settings:
    return fault_settings(
        backends.database_url,
        fault_redis.url,
        partitions=PARTITIONS,
        retry_base_seconds=0.1,
        retry_max_seconds=0.5,
    )


def _bodies(queue: str, rng: random.Random) -> list[dict[str, Any]]:
    flaky = [
        {
            "type": "demo.fail",
            "queue": queue,
            "payload": {"fail_times": 1 + i % 2, "message": "flaky"},
            "max_attempts": 5,
        }
        for i in range(FLAKY)
    ]
    poison = [
        {"type": "test.effect_fail", "queue": queue, "payload": {}, "max_attempts": 2}
        for _ in range(POISON)
    ]
    bodies = [effect_body(queue, rng) for _ in range(EFFECTS)] + flaky + poison
    rng.shuffle(bodies)
    return bodies


async def _wait_workers(settings: Settings, prefix: str, count: int) -> None:
    sql = "SELECT count(*) FROM workers WHERE starts_with(name, $1)"
    await db.wait_for_value(settings.database_url, sql, prefix, expected=count, timeout=90.0)


@pytest.mark.serial  # seven processes of its own: it would starve a test beside it
async def test_two_apis_and_five_worker_processes_finish_every_job_once(
    spawn: Spawner, settings: Settings, queue: str, results: Path
) -> None:
    await create_effects_table(settings.database_url)
    urls = [spawn.api()[1], spawn.api()[1]]
    prefix = f"{queue}-w"
    workers = [
        spawn.worker([queue], name=f"{prefix}a", processes=2),
        spawn.worker([queue], name=f"{prefix}b", processes=2),
        spawn.worker([queue], name=f"{prefix}c"),
    ]
    await _wait_workers(settings, prefix, 5)

    bodies = _bodies(queue, random.Random(15))
    ledgers = [Ledger(), Ledger()]
    halves = [bodies[0::2], bodies[1::2]]
    await asyncio.gather(
        *(
            LoadGenerator(ledger, url).run(half, rate=60.0)
            for ledger, url, half in zip(ledgers, urls, halves, strict=True)
        )
    )
    for ledger, half in zip(ledgers, halves, strict=True):
        assert ledger.count("ok") == len(half), (ledger.statuses, ledger.errors)

    ledger = Ledger({**ledgers[0].submissions, **ledgers[1].submissions})
    drained = await drain(settings.database_url, queue, timeout=75.0)
    report = await check("many_processes", settings.database_url, queue, ledger)
    history = report.snap.history
    terminal_events = Counter(
        job_id for job_id, events in history.items() for e in events if e.event in TERMINAL
    )
    claims = Counter(
        e.worker for events in history.values() for e in events if e.event == "claimed"
    )
    report.extra.update(
        drain_s=f"{drained:.1f}",
        apis=len(urls),
        worker_processes=len(claims),
        claims_per_process="/".join(str(n) for _, n in sorted(claims.items())),
    )
    for proc in workers:
        await asyncio.to_thread(proc.stop, 30)
    publish(report, results)

    report.assert_clean()
    assert report.jobs == len(bodies)
    missing = [i for i in ledger.ok() if terminal_events[i] != 1]
    assert not missing, f"jobs not exactly once terminal: {missing[:10]}"
    assert report.statuses == {"succeeded": EFFECTS + FLAKY, "dead": POISON}
    retried = sum(1 for events in history.values() if any(e.event == "failed" for e in events))
    assert retried >= FLAKY, "the flaky jobs did not fail first"
    assert len({r["job_id"] for r in report.snap.effects}) == EFFECTS
    expected = {f"{prefix}{n}-{i}" for n in "ab" for i in (1, 2)} | {f"{prefix}c"}
    assert set(claims) == expected, f"claims per process: {dict(claims)}"
    for proc in workers:
        assert "Traceback (most recent call last)" not in proc.output(), proc.output()[-3000:]
