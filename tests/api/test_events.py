"""GET /v1/jobs/{id}/events: every transition with its time, attempt, worker and actor."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import wait_for_status, wait_until
from tests.support.processes import Spawner

PRODUCER = {"X-API-Key": "events-producer"}
ADMIN = {"X-API-Key": "events-admin"}


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"api_keys": "producer:ev-producer:events-producer,admin:events-admin"}
    )


@pytest.fixture
async def admin(auth_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with auth on; the client sends the admin key unless told otherwise."""
    app = create_app(auth_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=ADMIN
        ) as c:
            yield c


async def history(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    events: list[dict[str, Any]] = response.json()
    times = [datetime.fromisoformat(e["at"]) for e in events]
    assert times == sorted(times), "events are oldest first"
    assert all(set(e) == {"at", "event", "attempt", "worker", "actor"} for e in events)
    return events


def rows(events: list[dict[str, Any]]) -> list[tuple[str, int, str | None, str | None]]:
    return [(e["event"], e["attempt"], e["worker"], e["actor"]) for e in events]


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json=body, headers=PRODUCER)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def test_failed_attempt_then_success(
    admin: httpx.AsyncClient, spawn: Spawner, auth_settings: Settings, queue: str
) -> None:
    spawn.worker([queue], name="ev-w1", settings=auth_settings)
    job = await submit(admin, {"type": "demo.fail", "queue": queue, "payload": {"fail_times": 1}})
    done = await wait_for_status(admin, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded"
    events = await history(admin, job["id"])
    producer = events[0]["actor"]
    assert producer == "ev-producer", "the id given in CONVEYOR_API_KEYS"
    assert rows(events) == [
        ("submitted", 0, None, producer),
        ("claimed", 1, "ev-w1", None),
        ("failed", 1, "ev-w1", None),
        ("promoted", 1, None, None),
        ("claimed", 2, "ev-w1", None),
        ("succeeded", 2, "ev-w1", None),
    ]
    # Written by the transitions' own statements: the same clock reading as the row.
    assert events[4]["at"] == done["started_at"]
    assert events[5]["at"] == done["finished_at"]
    assert events[2]["at"] == done["errors"][0]["at"]


async def test_dead_replayed_dead_removed(
    admin: httpx.AsyncClient, spawn: Spawner, auth_settings: Settings, queue: str
) -> None:
    spawn.worker([queue], name="ev-w2", settings=auth_settings)
    job = await submit(admin, {"type": "demo.fail", "queue": queue, "max_attempts": 1})
    await wait_for_status(admin, job["id"], {"dead"}, timeout=60)
    replay = await admin.post(f"/v1/dlq/{job['id']}/replay")
    assert replay.status_code == 202
    await wait_until(
        lambda: _has(admin, job["id"], ["dead", "replayed", "claimed", "dead"]), timeout=60
    )
    assert (await admin.delete(f"/v1/dlq/{job['id']}")).status_code == 204
    events = await history(admin, job["id"])
    operator = events[3]["actor"]
    assert operator is not None and operator.startswith("admin-"), "an id derived with a salt"
    assert rows(events) == [
        ("submitted", 0, None, events[0]["actor"]),
        ("claimed", 1, "ev-w2", None),
        ("dead", 1, "ev-w2", None),
        ("replayed", 0, None, operator),
        ("claimed", 1, "ev-w2", None),
        ("dead", 1, "ev-w2", None),
        ("dlq_removed", 1, None, operator),
    ]


async def _has(client: httpx.AsyncClient, job_id: str, tail: list[str]) -> bool:
    events = [e["event"] for e in (await client.get(f"/v1/jobs/{job_id}/events")).json()]
    return events[-len(tail) :] == tail


async def test_scheduled_then_cancelled(admin: httpx.AsyncClient, queue: str) -> None:
    job = await submit(admin, {"type": "demo.echo", "queue": queue, "delay_seconds": 600})
    cancel = await admin.post(f"/v1/jobs/{job['id']}/cancel", headers=PRODUCER)
    assert cancel.status_code == 200
    events = await history(admin, job["id"])
    actor = events[0]["actor"]
    assert rows(events) == [("scheduled", 0, None, actor), ("cancelled", 0, None, actor)]
    assert events[1]["at"] == cancel.json()["finished_at"]


async def test_lost_worker_is_reclaimed_by_another(
    admin: httpx.AsyncClient, spawn: Spawner, auth_settings: Settings, queue: str
) -> None:
    lost = spawn.worker([queue], name="ev-lost", settings=auth_settings)
    job = await submit(
        admin,
        {"type": "test.nap", "queue": queue, "payload": {"seconds": 60, "until_attempt": 1}},
    )
    await wait_for_status(admin, job["id"], {"running"}, timeout=60)
    assert [e["worker"] for e in await history(admin, job["id"])][-1] == "ev-lost"
    lost.signal(signal.SIGKILL)
    spawn.worker([queue], name="ev-rescuer", settings=auth_settings)
    done = await wait_for_status(admin, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded"
    assert done["result"] == {"worker": "ev-rescuer", "attempt": 2}
    events = await history(admin, job["id"])
    assert rows(events) == [
        ("submitted", 0, None, events[0]["actor"]),
        ("claimed", 1, "ev-lost", None),
        ("reclaimed", 1, "ev-lost", "ev-rescuer"),
        ("promoted", 1, None, None),
        ("claimed", 2, "ev-rescuer", None),
        ("succeeded", 2, "ev-rescuer", None),
    ]


async def test_events_of_unknown_or_foreign_job(
    admin: httpx.AsyncClient, auth_settings: Settings, queue: str
) -> None:
    assert (
        await admin.get("/v1/jobs/00000000-0000-0000-0000-000000000000/events")
    ).status_code == 404
    assert (await admin.get("/v1/jobs/nope/events")).status_code == 422
    job = await submit(admin, {"type": "demo.echo", "queue": queue, "delay_seconds": 600})
    unauthenticated = await admin.get(f"/v1/jobs/{job['id']}/events", headers={"X-API-Key": ""})
    assert unauthenticated.status_code == 401
