"""A worker SIGKILLed mid-job and a worker stopped mid-job: the scrape counts the reclaim (a
failed attempt with reason ``worker_lost``) and the hand-back, by their exact numbers."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

import httpx

from tests.conftest import submit, wait_until
from tests.observe.test_workload import mismatches, scrape
from tests.support.processes import Spawner


async def test_reclaims_and_hand_backs_are_counted(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    def job(**more: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({"queue": queue, "type": "test.nap", **more}.items()))

    async def counted(expected: Mapping[tuple[str, Any], float]) -> bool:
        return not mismatches(await scrape(client), expected)

    first = spawn.worker([queue], concurrency=2)
    nap = {"type": "test.nap", "queue": queue, "payload": {"seconds": 60}}
    lost = await submit(client, {**nap, "max_attempts": 1})
    started = {("conveyor_jobs_started_total", job()): 1}
    await wait_until(lambda: counted(started), timeout=60)  # its start has reached Redis
    first.signal(signal.SIGKILL)
    second = spawn.worker([queue], concurrency=2)

    async def status(job_id: str) -> str:
        return str((await client.get(f"/v1/jobs/{job_id}")).json()["status"])

    async def lost_is_dead() -> bool:
        return await status(lost["id"]) == "dead"

    await wait_until(lost_is_dead, timeout=60)
    handed = await submit(client, nap)

    async def handed_runs() -> bool:
        return await status(handed["id"]) == "running"

    await wait_until(handed_runs, timeout=60)
    second.stop()  # SIGTERM: after the 5 s grace the attempt is handed back
    assert await status(handed["id"]) == "queued"
    expected = {
        ("conveyor_jobs_started_total", job()): 2,
        ("conveyor_jobs_reclaimed_total", job()): 1,
        ("conveyor_job_attempts_failed_total", job(reason="worker_lost")): 1,
        ("conveyor_jobs_dead_total", job()): 1,
        ("conveyor_jobs_handed_back_total", job()): 1,
        ("conveyor_jobs_submitted_total", job()): 2,
    }
    await wait_until(lambda: counted(expected), timeout=30)
    samples = await scrape(client)
    assert ("conveyor_jobs_retried_total", job()) not in samples
    assert ("conveyor_jobs_succeeded_total", job()) not in samples
