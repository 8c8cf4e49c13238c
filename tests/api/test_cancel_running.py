"""Cancelling a running job: 202, the worker hears of it at its next heartbeat, stops the
handler (which may clean up), and the job ends ``cancelled`` with the actor recorded; no
further attempt runs, also not after the worker was lost."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_for_status, wait_until
from tests.support.processes import Spawner

ADMIN = {"X-API-Key": "admin-secret"}


@pytest.fixture
def settings(backends: Backends) -> Settings:
    # claim_idle_seconds 2: a heartbeat about every 0.7 s; keys on, so the actor is named.
    return make_settings(
        backends, api_keys="admin:admin-secret,producer:p-secret", cancel_grace_seconds=2.0
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS | ADMIN
        ) as c:
            yield c


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def history(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    return events


async def request_cancel(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "running" and job["cancel_requested_at"] is not None
    return job


async def test_a_running_demo_sleep_is_cancelled_mid_run(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=2)
    job = await submit(client, {"type": "demo.sleep", "queue": queue, "payload": {"seconds": 600}})
    await wait_for_status(client, job["id"], {"running"}, timeout=60)
    asked = await request_cancel(client, job["id"])
    again = await request_cancel(client, job["id"])  # asking twice changes nothing
    assert again["cancel_requested_at"] == asked["cancel_requested_at"]
    done = await wait_for_status(client, job["id"], {"cancelled", "succeeded", "dead"}, 30)
    assert done["status"] == "cancelled"
    assert done["result"] is None and done["attempts"] == 1 and done["finished_at"] is not None
    events = await history(client, job["id"])
    assert [e["event"] for e in events] == ["submitted", "claimed", "cancel_requested", "cancelled"]
    assert events[2]["actor"] == events[3]["actor"] is not None  # who cancelled: the admin key
    assert events[3]["worker"] is not None  # ...and which worker stopped it
    response = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409 and response.json()["details"] == {"status": "cancelled"}
    # The worker's slot is free again and the job never runs again.
    sentinel = await submit(client, {"type": "demo.echo", "queue": queue})
    await wait_for_status(client, sentinel["id"], {"succeeded"}, timeout=60)
    assert len(await history(client, job["id"])) == 4


@pytest.mark.parametrize("swallow", [False, True])
async def test_the_handler_sees_the_cancellation_and_may_clean_up(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path, swallow: bool
) -> None:
    spawn.worker([queue], concurrency=1)
    path = tmp_path / "cleanup"
    payload = {"path": str(path), "seconds": 600, "swallow": swallow}
    job = await submit(client, {"type": "test.cancellable", "queue": queue, "payload": payload})
    await wait_until(lambda: _exists(Path(f"{path}.started")), timeout=60)
    await request_cancel(client, job["id"])
    done = await wait_for_status(client, job["id"], {"cancelled", "succeeded", "dead"}, 30)
    # Even a handler that catches the cancellation and returns a value ends cancelled.
    assert (done["status"], done["result"]) == ("cancelled", None)
    assert path.read_text() == "CancelledError ctx.cancelled=True"


async def _exists(path: Path) -> bool:
    return path.exists()


async def test_a_handler_that_ignores_the_cancellation_is_abandoned_after_the_grace(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=1)
    body = {"type": "test.stubborn", "queue": queue, "payload": {"seconds": 120}}
    job = await submit(client, body)
    await wait_for_status(client, job["id"], {"running"}, timeout=60)
    await request_cancel(client, job["id"])
    done = await wait_for_status(client, job["id"], {"cancelled", "succeeded", "dead"}, 30)
    assert done["status"] == "cancelled"


async def test_a_cancel_requested_while_the_worker_was_lost_ends_cancelled(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    first = spawn.worker([queue], concurrency=1)
    body = {"type": "test.nap", "queue": queue, "payload": {"seconds": 600}, "max_attempts": 5}
    job = await submit(client, body)
    await wait_for_status(client, job["id"], {"running"}, timeout=60)
    first.signal(signal.SIGKILL)
    await request_cancel(client, job["id"])  # nobody hears it: the job's worker is gone
    spawn.worker([queue], concurrency=1)
    done = await wait_for_status(client, job["id"], {"cancelled", "succeeded", "dead"}, 60)
    assert done["status"] == "cancelled" and done["attempts"] == 1
    events = [e["event"] for e in await history(client, job["id"])]
    assert events == ["submitted", "claimed", "cancel_requested", "cancelled"]
    sentinel = await submit(client, {"type": "demo.echo", "queue": queue})
    await wait_for_status(client, sentinel["id"], {"succeeded"}, timeout=60)
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "cancelled"
    assert [e["event"] for e in await history(client, job["id"])] == events  # never claimed again
