"""Retries with exponential backoff, the error history, and the permanent-failure error."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.conftest import Backends, make_settings, wait_for_status
from tests.support.processes import Spawner

BASE = 2.0  # seconds: attempt n waits between BASE·2^(n-1)/2 and BASE·2^(n-1)


@pytest.fixture
def settings(backends: Backends) -> Settings:
    # A base large against the promotion poll, so the backoff dominates the measured gaps.
    return make_settings(
        backends, retry_base_seconds=BASE, retry_max_seconds=60.0, promote_interval_seconds=0.05
    )


async def _submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def _events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    events: list[dict[str, Any]] = response.json()
    return events


def _at(events: list[dict[str, Any]], name: str, attempt: int) -> datetime:
    [found] = [e for e in events if e["event"] == name and e["attempt"] == attempt]
    return datetime.fromisoformat(found["at"])


async def test_fails_twice_then_succeeds_with_growing_backoff(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    worker = spawn.worker([queue], name=f"retry-{queue}")
    job = await _submit(
        client,
        {
            "type": "demo.fail",
            "queue": queue,
            "max_attempts": 3,
            "payload": {"fail_times": 2, "message": "flaky dependency"},
        },
    )
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 3
    assert done["result"] == {"attempt": 3}
    errors = done["errors"]
    assert [e["attempt"] for e in errors] == [1, 2]
    for error in errors:
        assert error["error"] == "flaky dependency"
        assert error["type"] == "DemoFailure"
        assert "DemoFailure: flaky dependency" in error["traceback"]
        assert error["worker"] == worker.name
    assert errors[0]["at"] < errors[1]["at"] < done["finished_at"]

    events = await _events(client, job["id"])
    names = [e["event"] for e in events]
    assert names == [
        "submitted",
        "claimed",
        "failed",
        "promoted",
        "claimed",
        "failed",
        "promoted",
        "claimed",
        "succeeded",
    ]
    # The wait after failure n is at least half of BASE·2^(n-1) (equal jitter): 1 s, then 2 s.
    gap1 = (_at(events, "promoted", 1) - _at(events, "failed", 1)).total_seconds()
    gap2 = (_at(events, "promoted", 2) - _at(events, "failed", 2)).total_seconds()
    assert BASE / 2 <= gap1 <= BASE + 5, gap1
    assert BASE <= gap2 <= 2 * BASE + 5, gap2
    assert gap2 > gap1, (gap1, gap2)


async def test_permanent_error_goes_dead_after_one_attempt(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    job = await _submit(
        client,
        {
            "type": "test.permanent",
            "queue": queue,
            "max_attempts": 5,
            "payload": {"message": "card declined"},
        },
    )
    dead = await wait_for_status(client, job["id"], {"dead", "succeeded"}, timeout=30)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 1
    assert dead["next_attempt_at"] is None
    assert dead["finished_at"] is not None
    [error] = dead["errors"]
    assert error["error"] == "card declined"
    assert error["type"] == "PermanentError"
    names = [e["event"] for e in await _events(client, job["id"])]
    assert names == ["submitted", "claimed", "dead"]


async def test_unknown_exception_uses_every_attempt_then_dead(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    job = await _submit(
        client, {"type": "demo.fail", "queue": queue, "max_attempts": 2, "payload": {}}
    )
    dead = await wait_for_status(client, job["id"], {"dead", "succeeded"}, timeout=60)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 2
    assert [e["attempt"] for e in dead["errors"]] == [1, 2]
    assert [e["error"] for e in dead["errors"]] == ["demo failure", "demo failure"]
    names = [e["event"] for e in await _events(client, job["id"])]
    assert names.count("claimed") == 2
    assert names[-1] == "dead"
