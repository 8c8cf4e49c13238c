"""GET /metrics: the gauges report what Postgres holds (a snapshot at most
CONVEYOR_METRICS_SNAPSHOT_SECONDS old), so any API process (of `conveyor api --workers N`)
gives the same answer, and a job removed from the DLQ is no longer counted as dead."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import submit, wait_until
from tests.support.processes import Spawner


async def scrape(client: httpx.AsyncClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(response.text)
    }


async def test_no_family_claims_a_submission_count_it_does_not_keep(
    client: httpx.AsyncClient, queue: str
) -> None:
    for _ in range(3):
        await submit(client, {"type": "demo.echo", "queue": queue})
    metrics = await scrape(client)
    assert metrics["conveyor_jobs"][(("queue", queue), ("status", "queued"))] == 3
    for name, samples in metrics.items():
        if "submitted" in name:  # a per-process counter would be wrong with several processes
            mine = [v for labels, v in samples.items() if ("queue", queue) in labels]
            assert sum(mine) == 3, (name, samples)


async def test_jobs_removed_from_the_dlq_are_not_counted_as_dead(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    item = {"type": "test.permanent", "queue": queue, "payload": {}}
    jobs = [await submit(client, item) for _ in range(3)]

    async def dead() -> float:
        samples = (await scrape(client)).get("conveyor_jobs", {})
        return samples.get((("queue", queue), ("status", "dead")), 0)

    async def all_dead() -> bool:
        return await dead() == 3

    await wait_until(all_dead, timeout=30)
    assert (await client.delete(f"/v1/dlq/{jobs[0]['id']}")).status_code == 204

    async def two_dead() -> bool:  # the gauges come from a snapshot a few seconds old at most
        return await dead() == 2

    await wait_until(two_dead, timeout=30)
    stats = [q for q in (await client.get("/v1/queues")).json()["items"] if q["queue"] == queue]
    assert stats[0]["dead"] == 2, "the queue stats count the DLQ the same way"
    assert (await client.get(f"/v1/jobs/{jobs[0]['id']}")).json()["status"] == "dead"
