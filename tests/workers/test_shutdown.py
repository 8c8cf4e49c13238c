"""Graceful shutdown: stop reading, drain for the grace period, hand back the rest, exit 0."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.settings import Settings
from app.streams.keys import GROUP, Keys
from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Proc, Spawner
from workers.runner import LOOP_STOP_SECONDS
from workers.shutdown import (
    CANCEL_WAIT_SECONDS,
    EXIT_ABANDONED,
    EXIT_FORCED,
    FORCED_EXIT_SECONDS,
)


async def _nap(
    client: httpx.AsyncClient, queue: str, seconds: float, job_type: str = "test.nap"
) -> str:
    body = {"type": job_type, "queue": queue, "payload": {"seconds": seconds}}
    return str((await submit(client, body))["id"])


async def _statuses(client: httpx.AsyncClient, ids: list[str]) -> list[str]:
    return [(await client.get(f"/v1/jobs/{i}")).json()["status"] for i in ids]


async def _events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    return events


async def _exit_code(proc: Proc, timeout: float) -> int:
    async def exited() -> bool:
        return not proc.alive()

    await wait_until(exited, timeout=timeout)
    code = proc.proc.returncode
    assert code is not None
    return code


async def _consumers(redis: Redis, settings: Settings, queue: str) -> set[str]:
    names: set[str] = set()
    for stream in Keys(settings.redis_prefix).queue_streams(queue, settings.partitions):
        names |= {c["name"] for c in await redis.xinfo_consumers(stream, GROUP)}
    return names


async def test_sigterm_hands_back_jobs_that_outlive_the_grace_period(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    grace = 1.0
    leaving = spawn.worker(
        [queue],
        concurrency=4,
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": grace}),
    )
    ids = [await _nap(client, queue, 8) for _ in range(3)]
    await _started(client, ids)
    assert leaving.name in await _consumers(redis, settings, queue)

    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=30) == 0
    assert time.monotonic() - started < grace + 20
    # Queued, not succeeded: it did not wait for the 8 s jobs; nothing is left running.
    assert await _statuses(client, ids) == ["queued"] * 3
    for job_id in ids:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["attempts"] == 0  # the interrupted attempt does not count
        assert job["errors"] == []
        released = [e for e in await _events(client, job_id) if e["event"] == "released"]
        assert [(e["worker"], e["attempt"]) for e in released] == [(leaving.name, 1)]
    # Its pending entries were acked, so its consumer could be removed from the group.
    assert leaving.name not in await _consumers(redis, settings, queue)

    successor = spawn.worker([queue], concurrency=4, name=f"successor-{queue}")
    for job_id in ids:
        done = await wait_for_status(client, job_id, {"succeeded", "dead"}, timeout=60)
        assert done["attempts"] == 1
        assert done["result"] == {"worker": successor.name, "attempt": 1}
        assert done["errors"] == []


async def test_a_time_limit_inside_the_grace_period_still_fires(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """Time limits are armed as they draw near (workers/deadlines.py), by a sweep that keeps
    running through the grace period: a job whose limit falls inside it fails on time (a
    counted attempt with a timeout error), not handed back when the grace ends."""
    leaving = spawn.worker(
        [queue],
        concurrency=2,
        name=f"limited-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": 8.0}),
    )
    body = {"type": "test.nap", "queue": queue, "payload": {"seconds": 20}, "timeout_seconds": 3}
    job_id = str((await submit(client, body))["id"])
    await _started(client, [job_id])
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=30) == 0
    assert time.monotonic() - started < 7  # the limit ended the drain, not the 8 s grace
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["attempts"] == 1 and job["status"] == "retrying", job
    assert [e["error"] for e in job["errors"]] == ["timeout"]


async def _all(client: httpx.AsyncClient, ids: list[str], status: str) -> bool:
    return all(s == status for s in await _statuses(client, ids))


async def _started(client: httpx.AsyncClient, ids: list[str]) -> None:
    """Until the worker runs these jobs. Postgres says ``running`` once the claim commits;
    the worker starts them when the claim's answer reaches it, a moment later. A stop signal
    in between hands them straight back instead (``Reader._release_late``), which is right
    but is not what these tests are about."""
    await wait_until(lambda: _all(client, ids, "running"), timeout=30)
    await asyncio.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_lets_in_flight_jobs_finish_and_takes_no_new_ones(
    client: httpx.AsyncClient,
    spawn: Spawner,
    queue: str,
    settings: Settings,
    redis: Redis,
    sig: signal.Signals,
) -> None:
    leaving = spawn.worker(
        [queue],
        concurrency=4,
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": 30.0}),
    )
    ids = [await _nap(client, queue, 3) for _ in range(2)]
    await _started(client, ids)
    leaving.signal(sig)
    late = await _nap(client, queue, 0)  # submitted after the signal: not for this worker

    assert await _exit_code(leaving, timeout=30) == 0
    for job_id in ids:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "succeeded", (job, leaving.output())
        assert job["result"] == {"worker": leaving.name, "attempt": 1}
        assert "released" not in [e["event"] for e in await _events(client, job_id)]
    assert (await client.get(f"/v1/jobs/{late}")).json()["status"] == "queued"
    assert leaving.name not in await _consumers(redis, settings, queue)

    successor = spawn.worker([queue], name=f"successor-{queue}")
    done = await wait_for_status(client, late, {"succeeded", "dead"}, timeout=30)
    assert done["result"] == {"worker": successor.name, "attempt": 1}


async def test_second_stop_signal_ends_the_grace_period_at_once(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    leaving = spawn.worker(
        [queue],
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": 120.0}),
    )
    job_id = await _nap(client, queue, 120)
    await _started(client, [job_id])
    leaving.signal(signal.SIGTERM)

    async def draining() -> bool:
        return "draining 1 job(s)" in leaving.output()

    await wait_until(draining, timeout=20)
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=40) == 0  # well before the 120 s grace
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert (job["status"], job["attempts"]) == ("queued", 0)


async def _handed_back(client: httpx.AsyncClient, ids: list[str], worker: Proc) -> None:
    for job_id in ids:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        state = (job["status"], job["attempts"], job["errors"])
        assert state == ("queued", 0, []), worker.output()
        released = [e for e in await _events(client, job_id) if e["event"] == "released"]
        assert [(e["worker"], e["attempt"]) for e in released] == [(worker.name, 1)]


async def test_handler_ignoring_cancellation_cannot_hold_the_worker_past_the_grace_period(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """After the grace period the worker cancels what still runs and waits a short, fixed time:
    a handler that swallows the cancellation is abandoned (its job handed back like the rest),
    and the worker exits with EXIT_ABANDONED instead of hanging."""
    grace = 1.0
    leaving = spawn.worker(
        [queue],
        concurrency=4,
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": grace}),
    )
    ids = [await _nap(client, queue, 300, "test.stubborn"), await _nap(client, queue, 300)]
    await _started(client, ids)
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=30) == EXIT_ABANDONED
    assert time.monotonic() - started < grace + LOOP_STOP_SECONDS + CANCEL_WAIT_SECONDS + 5
    await _handed_back(client, ids, leaving)
    assert "ignored cancellation" in leaving.output()


async def test_second_signal_exits_even_when_a_handler_ignores_cancellation(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    leaving = spawn.worker(
        [queue],
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": 120.0}),
    )
    job_id = await _nap(client, queue, 300, "test.stubborn")
    await _started(client, [job_id])
    leaving.signal(signal.SIGTERM)

    async def draining() -> bool:
        return "draining 1 job(s)" in leaving.output()

    await wait_until(draining, timeout=20)
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=40) == EXIT_ABANDONED
    assert time.monotonic() - started < CANCEL_WAIT_SECONDS + 5  # not the 120 s grace
    await _handed_back(client, [job_id], leaving)


async def test_second_signal_exits_even_when_a_handler_blocks_the_event_loop(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """A handler that blocks the event loop (synchronous code) cannot be cancelled at all:
    the watchdog armed by the signals ends the process FORCED_EXIT_SECONDS after the second."""
    leaving = spawn.worker(
        [queue],
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": 120.0}),
    )
    job_id = await _nap(client, queue, 300, "test.block")
    await wait_until(lambda: _all(client, [job_id], "running"), timeout=30)
    await asyncio.sleep(0.5)  # the handler has started and holds the event loop
    leaving.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=FORCED_EXIT_SECONDS + 20) == EXIT_FORCED
    assert FORCED_EXIT_SECONDS - 1 < time.monotonic() - started < FORCED_EXIT_SECONDS + 10
    assert "shutdown did not finish" in leaving.output()


async def test_draining_jobs_keep_their_leases_while_other_workers_watch(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """A job that needs longer than the lease to finish during the grace period keeps its
    lease: the heartbeat goes on until the hand-back, so no other worker reclaims (and runs
    again) a job that is still running."""
    leaving = spawn.worker(
        [queue],
        name=f"leaving-{queue}",
        settings=settings.model_copy(update={"shutdown_grace_seconds": 30.0}),
    )
    seconds = 4 * settings.claim_idle_seconds
    job_id = await _nap(client, queue, seconds)
    await _started(client, [job_id])
    spawn.worker([queue], name=f"watcher-{queue}")  # would reclaim a lapsed lease
    await asyncio.sleep(settings.claim_idle_seconds)  # the watcher is up and reclaiming
    leaving.signal(signal.SIGTERM)
    assert await _exit_code(leaving, timeout=30 + seconds) == 0
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert (job["status"], job["attempts"], job["errors"]) == ("succeeded", 1, [])
    assert job["result"] == {"worker": leaving.name, "attempt": 1}
    assert "reclaimed" not in [e["event"] for e in await _events(client, job_id)]
