"""Progress reports are coalesced in the worker: however often a handler reports, each job's
progress is written a few times a second at most."""

from __future__ import annotations

import asyncio
import time

import httpx

from app.settings import Settings
from tests.conftest import submit, wait_for_status
from workers.context import WorkerConfig
from workers.progress import FLUSH_SECONDS
from workers.runner import Worker


async def test_reports_are_coalesced_into_a_few_writes_a_second(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    worker = Worker(settings, WorkerConfig([queue], concurrency=2, name="progress-coalesce"))
    running = asyncio.create_task(worker.run())
    try:
        steps, pause = 200, 0.01  # 200 reports in about 2 s (more on a busy machine)
        body = {
            "type": "test.progress",
            "queue": queue,
            "payload": {"steps": steps, "pause": pause},
        }
        job = await submit(client, body)
        await wait_for_status(client, job["id"], {"running"}, timeout=60)
        started = time.monotonic()
        done = await wait_for_status(client, job["id"], {"succeeded"}, timeout=60)
        took = time.monotonic() - started
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
    written = worker.progress.written
    print(f"\n{steps} reports in {took:.2f}s: {written} progress statements")
    assert 1 <= written <= took / FLUSH_SECONDS + 3, (written, took)
    assert written < steps / 4
    assert done["progress"] is not None and 0 < done["progress"]["value"] <= 1
