"""RetryLater: a handler (or http.request on 429/503 with Retry-After) defers the job without
spending an attempt; real workers, and a local HTTP server for http.request."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from app.devserver import free_port
from app.errors import MAX_RETRY_LATER_SECONDS, RetryLater
from app.settings import Settings
from tests.conftest import submit, wait_for_status
from tests.support.http_server import serving
from tests.support.processes import Spawner
from workers.handlers.http import retry_after


async def history(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    return events


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["at"]).timestamp()


async def test_retry_later_waits_without_spending_attempts(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=2)
    body = {
        "type": "test.defer",
        "queue": queue,
        "payload": {"seconds": 1.0, "times": 2},
        "max_attempts": 1,  # a single failure would make it dead
    }
    job = await submit(client, body)
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done["errors"]
    assert done["attempts"] == 1 and done["errors"] == []
    assert done["result"] == {"attempt": 1, "runs": 3}
    events = await history(client, job["id"])
    names = [e["event"] for e in events]
    assert names == [
        "submitted",
        "claimed",
        "deferred",
        "promoted",
        "claimed",
        "deferred",
        "promoted",
        "claimed",
        "succeeded",
    ]
    assert [e["attempt"] for e in events if e["event"] in ("claimed", "deferred")] == [1] * 5
    for deferred, again in ((events[2], events[4]), (events[5], events[7])):
        assert at(again) - at(deferred) >= 0.9  # it waited as told


async def test_a_deferred_job_waits_as_retrying_and_can_be_cancelled(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=1)
    body = {"type": "test.defer", "queue": queue, "payload": {"seconds": 300, "times": 1}}
    job = await submit(client, body)
    waiting = await wait_for_status(client, job["id"], {"retrying"}, timeout=60)
    assert waiting["attempts"] == 0 and waiting["errors"] == []
    wait = datetime.fromisoformat(waiting["next_attempt_at"]).timestamp() - time.time()
    assert 250 < wait <= 300
    response = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"


def test_retry_later_clamps_its_delay() -> None:
    assert RetryLater(5).seconds == 5
    assert RetryLater(-3).seconds == 0
    assert RetryLater(float("nan")).seconds == 0
    assert RetryLater(10**12).seconds == MAX_RETRY_LATER_SECONDS


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = time.time()
    assert retry_after(None, now) is None
    assert retry_after("soon", now) is None
    assert retry_after("120", now) == 120
    assert retry_after(" 0 ", now) == 1  # at least a second
    assert retry_after("9" * 5000, now) == 3600  # capped (and no huge int parsing)
    later = email.utils.formatdate(now + 90, usegmt=True)
    wait = retry_after(later, now)
    assert wait is not None and 88 <= wait <= 91
    assert retry_after(email.utils.formatdate(now - 600, usegmt=True), now) == 1


# -- http.request against a local server ----------------------------------------------------------


@dataclass
class Limited:
    port: int
    seen: dict[str, list[float]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def build_app(target: Limited) -> Starlette:
    async def limited(request: Request) -> Response:
        """Answers `code` with Retry-After (`after`: "date:N" for an HTTP date N s ahead, or
        "none" for no header) the first time a key is seen, then 200."""
        key = request.path_params["key"]
        calls = target.seen.setdefault(key, [])
        calls.append(time.time())
        if len(calls) > 1:
            return PlainTextResponse("fine now")
        after = request.query_params.get("after", "1")
        headers = {}
        if after.startswith("date:"):
            headers["Retry-After"] = email.utils.formatdate(
                time.time() + float(after[5:]), usegmt=True
            )
        elif after != "none":
            headers["Retry-After"] = after
        code = int(request.path_params["code"])
        return PlainTextResponse("slow down", status_code=code, headers=headers)

    return Starlette(routes=[Route("/limited/{code:int}/{key}", limited, methods=["POST"])])


@pytest.fixture
async def limited() -> AsyncIterator[Limited]:
    t = Limited(free_port())
    async with serving(build_app(t), t.port):
        yield t


async def test_http_request_defers_on_429_and_503_with_retry_after(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, limited: Limited
) -> None:
    allowed = settings.model_copy(update={"http_allowed_hosts": f"127.0.0.1:{limited.port}"})
    spawn.worker([queue], settings=allowed)
    cases = {"k429": "/limited/429/k429?after=2", "k503": "/limited/503/k503?after=date:3"}
    jobs = {}
    for key, path in cases.items():
        payload = {"url": limited.base + path}
        body = {"type": "http.request", "queue": queue, "payload": payload, "max_attempts": 1}
        jobs[key] = await submit(client, body)
    for key, job in jobs.items():
        done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
        assert done["status"] == "succeeded", (key, done["errors"])
        assert done["attempts"] == 1 and done["errors"] == []
        assert done["result"]["body"] == "fine now"
        names = [e["event"] for e in await history(client, job["id"])]
        assert names.count("deferred") == 1 and "failed" not in names
        first, second = limited.seen[key]
        assert second - first >= (1.9 if key == "k429" else 1.5)  # Retry-After was honoured

    # Without Retry-After a 429 is an ordinary failed attempt (here the last one: dead).
    payload = {"url": limited.base + "/limited/429/bare?after=none"}
    body = {"type": "http.request", "queue": queue, "payload": payload, "max_attempts": 1}
    job = await submit(client, body)
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "dead" and done["attempts"] == 1
    assert done["errors"][0]["error"].startswith("HTTP 429 from 127.0.0.1")
