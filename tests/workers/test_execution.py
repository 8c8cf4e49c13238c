"""Results and errors a handler produces are always storable, so one job cannot jam a worker."""

from __future__ import annotations

from typing import Any

import httpx

from app.settings import Settings
from tests.conftest import wait_for_status
from tests.support.processes import Spawner


async def _run(client: httpx.AsyncClient, queue: str, kind: str) -> dict[str, Any]:
    body = {
        "type": "test.weird_result",
        "queue": queue,
        "payload": {"kind": kind},
        "max_attempts": 1,
    }
    job = (await client.post("/v1/jobs", json=body)).json()
    return await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)


async def test_unstorable_text_in_results_and_errors_is_replaced(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=4)
    nul = await _run(client, queue, "nul")
    assert nul["status"] == "succeeded"
    assert nul["result"] == {"text": "a\ufffdb", "k\ufffd": 1}
    surrogate = await _run(client, queue, "surrogate")
    assert surrogate["status"] == "succeeded"
    assert surrogate["result"] == {"text": "x?y"}
    failed = await _run(client, queue, "nul_error")
    assert failed["status"] == "dead"
    [error] = failed["errors"]
    assert error["error"] == "bad\ufffdbyte ?"


async def test_non_json_results_fail_the_attempt_and_the_worker_goes_on(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=4)
    for kind in ("nan", "object"):
        job = await _run(client, queue, kind)
        assert job["status"] == "dead"
        [error] = job["errors"]
        assert error["type"] == "ResultNotStorable"
    # The worker is still healthy: a normal job after them succeeds.
    echo = (await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})).json()
    assert (await wait_for_status(client, echo["id"], {"succeeded"}))["status"] == "succeeded"


async def test_outcome_postgres_refuses_fails_alone_and_the_worker_goes_on(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """A result that is valid JSON but that Postgres refuses (class 22: a number over numeric's
    131072 digits) must not wedge the reporter: that job fails with a clear error, the outcomes
    reported beside and after it are written."""
    # Python's int-to-text conversion of that number holds the event loop for a second or
    # two: a lease longer than that keeps the job from being reclaimed meanwhile.
    worker = spawn.worker(
        [queue],
        concurrency=4,
        settings=settings.model_copy(update={"claim_idle_seconds": 20.0}),
        PYTHONINTMAXSTRDIGITS="0",
    )
    body = {
        "type": "test.huge_number",
        "queue": queue,
        "payload": {"digits": 140_000},
        "max_attempts": 1,
    }
    huge = (await client.post("/v1/jobs", json=body)).json()
    echoes = [
        (await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})).json()
        for _ in range(3)
    ]
    dead = await wait_for_status(client, huge["id"], {"succeeded", "dead"}, timeout=30)
    assert dead["status"] == "dead"
    assert dead["result"] is None
    [error] = dead["errors"]
    assert error["type"] == "OutcomeNotStorable", worker.output()[-3000:]
    assert error["error"].startswith("outcome could not be stored")
    assert "22003" in error["error"]  # numeric_value_out_of_range
    for echo in echoes:
        done = await wait_for_status(client, echo["id"], {"succeeded", "dead"}, timeout=30)
        assert done["status"] == "succeeded"
    assert "Postgres refused" in worker.output()
