"""Worker faults: SIGKILL storms, a paused (stale) worker, poison jobs that kill their worker.

Scenarios 1, 2 and 6 of the fault-injection suite, and the no-fault baseline they compare
with. Jobs are submitted to a real API process by the load generator; workers are real
processes kept alive by the supervisor.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from app.settings import Settings
from tests.faults.checker import conclude
from tests.faults.harness import (
    Fault,
    effect_body,
)
from tests.faults.scenario import start_scenario
from tests.support.processes import Spawner


async def test_baseline_without_faults(
    spawn: Spawner, settings: Settings, queue: str, results: Path
) -> None:
    """The reference figures: the scenario-1 load with no fault; nothing runs twice."""
    run = await start_scenario(spawn, settings, queue, seed=0, workers=3)
    await run.gen.run(run.effects(queue, 1000), 40.0)
    report = await conclude(
        "baseline", settings.database_url, queue, run.ledger, run.workers, results
    )
    assert report.statuses == {"succeeded": report.jobs}
    assert report.dup_exec == 0


async def test_sigkill_storm_loses_nothing(
    spawn: Spawner, settings: Settings, queue: str, results: Path
) -> None:
    """Scenario 1: a random worker is SIGKILLed every 2 s while 1000 jobs flow; the supervisor
    restarts it. Every accepted job ends terminal once, nothing runs that was not accepted."""
    run = await start_scenario(spawn, settings, queue, seed=1, workers=3)
    ledger, workers = run.ledger, run.workers
    stop = asyncio.Event()
    chaos = asyncio.create_task(workers.kill_randomly(2.0, run.rng, stop, limit=15))
    await run.gen.run(run.effects(queue, 1000), 40.0)
    stop.set()
    await chaos
    report = await conclude(
        "worker_sigkill",
        settings.database_url,
        queue,
        ledger,
        workers,
        results,
        workers.faults,
        kills=len(workers.faults),
    )
    assert report.statuses == {"succeeded": report.jobs}
    assert len(workers.faults) >= 8


async def test_paused_worker_is_fenced(
    spawn: Spawner, settings: Settings, queue: str, results: Path
) -> None:
    """Scenario 2: a worker is SIGSTOPped for 3x the claim idle time, then SIGCONT, twice. Its
    jobs are reclaimed and run elsewhere; when it wakes, its completions are rejected by the
    attempt fence: no stale attempt ever writes a terminal state."""
    run = await start_scenario(spawn, settings, queue, seed=2)
    rng, gen, ledger, workers = run.rng, run.gen, run.ledger, run.workers
    # Jobs long enough that the paused worker holds some mid-handler; a load one worker
    # can carry alone.
    bodies = [
        effect_body(queue, rng, payload={"sleep_ms": rng.randint(100, 400)}) for _ in range(800)
    ]
    load = run.load(bodies, 30.0)
    faults: list[Fault] = []
    victim = workers.names[0]
    for fraction in (0.2, 0.6):
        await gen.reached(fraction * len(bodies))
        faults.append(Fault(time.time(), "sigstop", worker=victim))
        workers.procs[victim].signal(signal.SIGSTOP)
        await asyncio.sleep(3 * settings.claim_idle_seconds)
        workers.procs[victim].signal(signal.SIGCONT)
    await load
    report = await conclude(
        "worker_sigstop",
        settings.database_url,
        queue,
        ledger,
        workers,
        results,
        faults,
        pauses=len(faults),
    )
    assert report.statuses == {"succeeded": report.jobs}
    # Executions of attempts that were reclaimed while their worker was frozen: they ran,
    # but none of them is the attempt that wrote the job's terminal state.
    history = report.snap.history
    stale = [
        (e["job_id"], e["attempt"])
        for e in report.snap.effects
        if any(
            ev.event == "reclaimed" and ev.attempt == e["attempt"] for ev in history[e["job_id"]]
        )
    ]
    assert stale, "the pause reclaimed no running attempt: the fence was not exercised"
    for job_id, attempt in stale:
        won = [ev for ev in history[job_id] if ev.event in ("succeeded", "dead")]
        assert all(ev.attempt != attempt for ev in won), (job_id, attempt, won)
    assert report.extra["fenced"] >= len(stale)


async def test_poison_jobs_die_alone(
    spawn: Spawner, settings: Settings, queue: str, results: Path
) -> None:
    """Scenario 6: poison jobs (one kind kills its worker, one always raises) among healthy
    ones. Each poison job ends dead with attempts == max_attempts; every healthy job succeeds.
    """
    run = await start_scenario(spawn, settings, queue, seed=6)
    rng, ledger, workers = run.rng, run.ledger, run.workers
    poison = [
        {"type": "test.effect_crash", "queue": queue, "max_attempts": 3},
        {"type": "test.effect_fail", "queue": queue, "max_attempts": 3},
    ]
    bodies = run.effects(queue, 600)
    for _ in range(4):
        for body in poison:
            bodies.insert(rng.randrange(len(bodies)), dict(body))
    await run.gen.run(bodies, 40.0)
    report = await conclude(
        "poison", settings.database_url, queue, ledger, workers, results, workers.faults
    )
    by_type: dict[str, list[tuple[str, int, int]]] = {}
    for row in report.snap.jobs.values():
        by_type.setdefault(row["type"], []).append(
            (row["status"], row["attempts"], row["max_attempts"])
        )
    for kind in ("test.effect_crash", "test.effect_fail"):
        assert len(by_type[kind]) == 4
        assert all(s == "dead" and a == m for s, a, m in by_type[kind]), by_type[kind]
    assert {s for s, _, _ in by_type["test.effect"]} == {"succeeded"}
    assert workers.restarts >= 4  # the crash poison took its workers down
