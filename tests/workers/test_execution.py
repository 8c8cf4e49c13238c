"""Results and errors a handler produces are always storable, so one job cannot jam a worker."""

from __future__ import annotations

from typing import Any

import httpx

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
