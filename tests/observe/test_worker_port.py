"""``conveyor worker --metrics-port``: the worker process serves its own metrics (process
figures and what this process counted)."""

from __future__ import annotations

import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.devserver import free_port
from tests.conftest import submit, wait_until
from tests.support.processes import Spawner, env_for


async def test_a_worker_serves_its_own_metrics(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "app.cli", "worker", "--queues", queue]
    spawn._spawn("worker", [*argv, "--metrics-port", str(port)], env_for(spawn.settings))
    await submit(client, {"type": "demo.echo", "queue": queue})

    async def own_count() -> float | None:
        try:
            async with httpx.AsyncClient() as c:
                text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
        except httpx.HTTPError:
            return None
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert ("process_cpu_seconds_total", ()) in samples
        key = (("queue", queue), ("type", "demo.echo"))
        return samples.get(("conveyor_jobs_succeeded_total", key))

    assert await wait_until(own_count, timeout=60) == 1
