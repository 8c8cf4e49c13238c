"""Scenario 3: the API dies after its Postgres commit and before its XADD.

Two ways at once: rows committed exactly as the API commits them and never dispatched (an
API that died right after COMMIT), and a real API process SIGKILLed every 3 s under load
(the producer retries unanswered requests, with the same Idempotency-Key, on the restarted
API). Every job still runs, once per key.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

from app.db.engine import create_engine, create_session_factory
from app.jobs import repository
from app.settings import Settings
from tests.faults.checker import conclude
from tests.faults.harness import (
    Fault,
    Ledger,
    orphan_row,
)
from tests.faults.scenario import start_scenario
from tests.support.processes import Spawner

ORPHANS = 200


async def commit_orphans(settings: Settings, queue: str, ledger: Ledger) -> Fault:
    """Commit ``ORPHANS`` jobs as the API does, then 'die': no XADD, no confirmation."""
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine).begin() as session:
            rows = await repository.insert_jobs(
                session, [orphan_row(queue, uuid.uuid4().hex) for _ in range(ORPHANS)]
            )
    finally:
        await engine.dispose()
    at = time.time()
    for row in rows:
        ledger.record_direct(row.idempotency_key or "", row.id, at)
    return Fault(at, "commit_without_xadd", jobs=frozenset(r.id for r in rows))


async def test_api_death_between_commit_and_xadd(
    spawn: Spawner, settings: Settings, queue: str, results: Path
) -> None:
    run = await start_scenario(spawn, settings, queue, seed=3)
    api, gen, ledger, workers = run.api, run.gen, run.ledger, run.workers
    bodies = run.effects(queue, 700)
    load = run.load(bodies, 30.0)
    faults = [await commit_orphans(settings, queue, ledger)]
    for fraction in (0.15, 0.3, 0.45, 0.6, 0.75):
        await gen.reached(fraction * len(bodies))
        faults.append(Fault(time.time(), "api_sigkill"))
        api.signal(signal.SIGKILL)
        await asyncio.to_thread(api.proc.wait)
        api, gen.base_url = await asyncio.to_thread(spawn.api)
    await load
    report = await conclude(
        "api_crash_after_commit",
        settings.database_url,
        queue,
        ledger,
        workers,
        results,
        faults,
        breakdown={"orphan_recovery": faults[:1], "api_kill_recovery": faults[1:]},
        orphans=ORPHANS,
        api_kills=len(faults) - 1,
        retried=sum(1 for s in ledger.submissions.values() if s.tries > 1),
    )
    assert report.statuses == {"succeeded": report.jobs}
