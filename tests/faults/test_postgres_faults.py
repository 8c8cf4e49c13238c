"""Postgres faults, on a PostgreSQL server of this module's own (never the shared one).

Scenario 5 of the fault-injection suite: the server goes down mid-run and comes back. The
API answers 503 with ``Retry-After`` meanwhile (never another 5xx), writes nothing half-way,
and producers that retry with their Idempotency-Key get exactly one job each; workers keep
their outcomes, stop claiming, and resume by themselves.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.db.migrate import upgrade
from app.devserver import EmbeddedPostgres, EmbeddedRedis
from app.settings import Settings
from tests.faults.checker import conclude
from tests.faults.conftest import fault_settings
from tests.faults.harness import (
    Fault,
    LoadGenerator,
    Supervisor,
    effect_body,
)
from tests.faults.scenario import start_scenario
from tests.support import db
from tests.support.processes import Spawner

OUTAGE_SECONDS = 3.0


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"))
    upgrade(server.start())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(own_postgres: EmbeddedPostgres, fault_redis: EmbeddedRedis) -> Settings:
    return fault_settings(own_postgres.url, fault_redis.url)


async def test_postgres_restart_mid_run(
    spawn: Spawner,
    settings: Settings,
    own_postgres: EmbeddedPostgres,
    queue: str,
    results: Path,
) -> None:
    """Scenario 5: stop PostgreSQL at 40 % of the load, keep it down 3 s, start it again."""
    run = await start_scenario(spawn, settings, queue, seed=5)
    url, gen, ledger, workers = run.url, run.gen, run.ledger, run.workers
    bodies = run.effects(queue, 700)
    load = run.load(bodies, 30.0)
    await gen.reached(0.4 * len(bodies))
    # Jobs that finish while Postgres is down: their workers must hold the outcomes.
    naps = [{"type": "test.nap", "queue": queue, "payload": {"seconds": 1.5}, "max_attempts": 20}]
    await LoadGenerator(ledger, url).run(naps * 8, 100.0)
    await asyncio.sleep(0.5)
    fault = Fault(time.time(), "postgres_down")
    await asyncio.to_thread(own_postgres.stop)
    await asyncio.sleep(OUTAGE_SECONDS)
    own_postgres.start()  # from the main thread: the server dies with the thread that started it
    await load
    report = await conclude(
        "postgres_restart",
        settings.database_url,
        queue,
        ledger,
        workers,
        results,
        [fault],
        outage_s=OUTAGE_SECONDS,
        held_outcomes=workers.logged(r"reporting (\d+) outcome\(s\) failed"),
    )
    assert report.statuses == {"succeeded": report.jobs}
    assert report.extra["http_5xx_other"] == 0, ledger.statuses
    assert report.extra["http_503"] > 0, "no request met the outage"
    assert ledger.missing_retry_after == 0
    assert workers.restarts == 0, "a worker process died of the Postgres outage"
    assert report.extra["held_outcomes"] > 0, "no outcome waited for Postgres"


async def test_postgres_down_answers_503_and_writes_nothing(
    spawn: Spawner, settings: Settings, own_postgres: EmbeddedPostgres, queue: str
) -> None:
    """With Postgres stopped: /readyz 503, every submission 503 + Retry-After, promptly, and
    not one row for any of them once Postgres is back; a worker that lived through the outage
    runs the next job."""
    _, url = spawn.api()
    workers = Supervisor(spawn, [queue], 1)
    workers.start()
    await workers.ready(settings.database_url)
    keys = [uuid.uuid4().hex for _ in range(10)]
    await asyncio.to_thread(own_postgres.stop)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["postgres"] is False
            for key in keys:
                began = time.monotonic()
                response = await http.post(
                    "/v1/jobs",
                    json=effect_body(queue, random.Random(1)),
                    headers={"Idempotency-Key": key},
                )
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"].isdigit()
                assert response.json()["error"] == "unavailable"
                assert time.monotonic() - began < 10.0
    finally:
        own_postgres.start()
    written = await db.fetchval(
        settings.database_url,
        "SELECT count(*) FROM jobs WHERE idempotency_key = ANY($1::text[])",
        keys,
    )
    assert written == 0
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        response = await http.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        for _ in range(600):
            job = (await http.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] == "succeeded":
                break
            await asyncio.sleep(0.1)
        assert job["status"] == "succeeded"
    await workers.stop()
    assert workers.restarts == 0
