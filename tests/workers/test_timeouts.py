"""Timeouts: per job (`timeout_seconds`) and per type (registration); a timeout is a retry."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import wait_for_status
from tests.support.processes import Spawner


async def _submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def test_job_timeout_fails_the_attempt_and_the_retry_succeeds(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    worker = spawn.worker([queue])
    job = await _submit(
        client,
        {
            "type": "test.nap",
            "queue": queue,
            "timeout_seconds": 1,
            "payload": {"seconds": 60, "until_attempt": 1},
        },
    )
    assert job["timeout_seconds"] == 1
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=30)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2
    assert done["result"] == {"worker": worker.name, "attempt": 2}
    [error] = done["errors"]
    assert error["error"] == "timeout"
    assert error["attempt"] == 1
    assert error["worker"] == worker.name


async def test_type_timeout_applies_on_every_attempt_until_dead(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    job = await _submit(
        client,
        {"type": "test.slow", "queue": queue, "max_attempts": 2, "payload": {"seconds": 60}},
    )
    dead = await wait_for_status(client, job["id"], {"dead", "succeeded"}, timeout=30)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 2
    assert [(e["attempt"], e["error"]) for e in dead["errors"]] == [(1, "timeout"), (2, "timeout")]


async def test_job_timeout_overrides_the_type_timeout(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    quick = await _submit(
        client, {"type": "test.slow", "queue": queue, "payload": {"seconds": 0.1}}
    )
    longer = await _submit(
        client,
        {"type": "test.slow", "queue": queue, "timeout_seconds": 10, "payload": {"seconds": 2}},
    )
    for job in (quick, longer):
        done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=30)
        assert done["status"] == "succeeded", done["errors"]
        assert done["attempts"] == 1
        assert done["errors"] == []


async def test_default_timeout_bounds_jobs_and_types_and_jobs_may_change_it(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    """CONVEYOR_DEFAULT_TIMEOUT_SECONDS bounds a job that names no timeout and whose type names
    none; a type's timeout raises (or lowers) it; a job's own timeout wins over both."""
    spawn.worker([queue], CONVEYOR_DEFAULT_TIMEOUT_SECONDS="1")

    def nap(job_type: str, seconds: float, timeout: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": job_type,
            "queue": queue,
            "max_attempts": 1,
            "payload": {"seconds": seconds},
        }
        if timeout is not None:
            body["timeout_seconds"] = timeout
        return body

    hung = await _submit(client, nap("test.nap", 600))  # no timeout anywhere but the default
    type_raises = await _submit(client, nap("test.patient", 2))  # the type's 5 s > default 1 s
    job_raises = await _submit(client, nap("test.nap", 2, timeout=4))  # the job's 4 s > default
    job_lowers = await _submit(
        client, nap("test.patient", 3, timeout=1)
    )  # the job's 1 s < the type's
    outcomes = {}
    for name, job in [
        ("hung", hung),
        ("type_raises", type_raises),
        ("job_raises", job_raises),
        ("job_lowers", job_lowers),
    ]:
        done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=30)
        outcomes[name] = (done["status"], [e["error"] for e in done["errors"]])
    assert outcomes == {
        "hung": ("dead", ["timeout"]),
        "type_raises": ("succeeded", []),
        "job_raises": ("succeeded", []),
        "job_lowers": ("dead", ["timeout"]),
    }
