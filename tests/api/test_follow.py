"""`GET /v1/jobs/{id}/events?follow=true` (Server-Sent Events) and progress on the job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import submit, wait_until
from tests.support.processes import Spawner

PRODUCER = {"X-API-Key": "follow-producer"}
OTHER = {"X-API-Key": "follow-other"}
ADMIN = {"X-API-Key": "follow-admin"}


async def read_stream(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the stream, until the server closes it."""
    events: list[tuple[str, dict[str, Any]]] = []
    url = f"/v1/jobs/{job_id}/events"
    async with client.stream("GET", url, params={"follow": "true"}, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert kind is not None
                events.append((kind, json.loads(line.removeprefix("data: "))))
                kind = None
    return events


async def test_the_stream_shows_each_transition_and_progress_then_closes(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], name="follow-w")
    body = {"type": "test.progress", "queue": queue, "payload": {"steps": 3, "pause": 0.6}}
    job = await submit(client, body)
    started = time.monotonic()
    events = await asyncio.wait_for(read_stream(client, job["id"]), 60)
    print(f"\nstream closed after {time.monotonic() - started:.2f}s: {events}")
    transitions = [e["event"] for kind, e in events if kind == "transition"]
    assert transitions == ["submitted", "claimed", "succeeded"]
    progress = [e for kind, e in events if kind == "progress"]
    assert progress, "progress updates are in the stream"
    values = [p["value"] for p in progress]
    assert values == sorted(values) and all(0 < v <= 1 for v in values)
    # the terminal transition is the last event: the stream closed after it
    assert events[-1][0] == "transition" and events[-1][1]["event"] == "succeeded"
    # transition ids increase, so Last-Event-ID can resume
    ids = [e["id"] for kind, e in events if kind == "transition"]
    assert ids == sorted(ids)


async def test_a_finished_job_streams_its_history_and_closes(
    client: httpx.AsyncClient, queue: str
) -> None:
    job = await submit(client, {"type": "demo.echo", "queue": queue})
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    events = await asyncio.wait_for(read_stream(client, job["id"]), 20)
    assert [e["event"] for _, e in events] == ["submitted", "cancelled"]


async def test_a_follower_is_woken_by_a_cancel(client: httpx.AsyncClient, queue: str) -> None:
    job = await submit(client, {"type": "demo.echo", "queue": queue})
    reading = asyncio.ensure_future(read_stream(client, job["id"]))
    await asyncio.sleep(0.5)
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    events = await asyncio.wait_for(reading, 20)
    assert [e["event"] for _, e in events] == ["submitted", "cancelled"]


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/v1/jobs/00000000-0000-4000-8000-000000000000/events", params={"follow": "true"}
    )
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")


@pytest.fixture
async def keyed(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    keys = "producer:fp:follow-producer,producer:fo:follow-other,admin:follow-admin"
    app = create_app(settings.model_copy(update={"api_keys": keys}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as c:
            yield c


async def test_producers_follow_their_own_jobs_only(keyed: httpx.AsyncClient, queue: str) -> None:
    r = await keyed.post("/v1/jobs", json={"type": "demo.echo", "queue": queue}, headers=PRODUCER)
    job_id = r.json()["id"]
    assert (await keyed.post(f"/v1/jobs/{job_id}/cancel", headers=PRODUCER)).status_code == 200
    events = await read_stream(keyed, job_id, PRODUCER)
    assert [e["event"] for _, e in events] == ["submitted", "cancelled"]
    assert all(e["worker"] is None for _, e in events)  # admin-only fields stay hidden
    url = f"/v1/jobs/{job_id}/events"
    other = await keyed.get(url, params={"follow": "true"}, headers=OTHER)
    assert other.status_code == 404, "another producer's job: as if unknown"
    assert (await keyed.get(url, params={"follow": "true"})).status_code == 401
    assert (await keyed.get(url, params={"follow": "true"}, headers=ADMIN)).status_code == 200


async def test_progress_is_on_the_job_while_it_runs(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], name="progress-w")
    body = {"type": "test.progress", "queue": queue, "payload": {"steps": 4, "pause": 1.0}}
    job = await submit(client, body)
    assert job["progress"] is None

    async def mid_run() -> dict[str, Any] | None:
        current: dict[str, Any] = (await client.get(f"/v1/jobs/{job['id']}")).json()
        if current["status"] == "running" and current["progress"] is not None:
            return current
        return None

    seen = await wait_until(mid_run, timeout=60)
    assert 0 < seen["progress"]["value"] < 1
    assert seen["progress"]["message"].startswith("step ")
    done = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})
    assert done.json()["status"] == "succeeded"
    assert done.json()["progress"]["value"] >= seen["progress"]["value"]


async def test_a_retried_job_streams_every_attempt(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], name="follow-retry")
    job = await submit(client, {"type": "demo.fail", "queue": queue, "payload": {"fail_times": 1}})
    events = await asyncio.wait_for(read_stream(client, job["id"]), 90)
    assert [e["event"] for _, e in events] == [
        "submitted",
        "claimed",
        "failed",
        "promoted",
        "claimed",
        "succeeded",
    ]


async def test_last_event_id_resumes_after_that_event(
    client: httpx.AsyncClient, queue: str
) -> None:
    job = await submit(client, {"type": "demo.echo", "queue": queue})
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    [(_, submitted), (_, cancelled)] = await read_stream(client, job["id"])
    resumed = await read_stream(client, job["id"], {"Last-Event-ID": str(submitted["id"])})
    assert [e for _, e in resumed] == [cancelled]
