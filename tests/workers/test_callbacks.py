"""Completion callbacks, delivered by real workers to a local receiver and verified with the
``standardwebhooks`` library, as a producer service would verify them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from app.db.pool import create_pool
from app.devserver import free_port
from app.jobs import callbacks
from app.settings import Settings
from tests.conftest import Backends, make_settings, submit, wait_for_status, wait_until
from tests.support.http_server import serving
from tests.support.processes import Spawner

SECRET = "whsec_" + base64.b64encode(b"callback-test-key-32-bytes-long!").decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers 500 to the first ``fail[name]`` POSTs to ``/hook/{name}``, then 204."""

    port: int
    fail: dict[str, int] = field(default_factory=dict)
    seen: dict[str, list[Received]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"


@contextlib.asynccontextmanager
async def serve() -> AsyncIterator[Receiver]:
    receiver = Receiver(free_port())

    async def hook(request: Request) -> Response:
        name = request.path_params["name"]
        seen = receiver.seen.setdefault(name, [])
        seen.append(Received(dict(request.headers), await request.body()))
        if len(seen) <= receiver.fail.get(name, 0):
            return PlainTextResponse("not now", status_code=500)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook/{name}", hook, methods=["POST"])])
    async with serving(app, receiver.port):
        yield receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve() as r:
        yield r


@pytest.fixture
def settings(backends: Backends, receiver: Receiver) -> Settings:
    """The API and the workers allow the receiver's address and sign with ``SECRET``."""
    return make_settings(
        backends,
        http_allowed_hosts=f"127.0.0.1:{receiver.port}",
        http_signing_secret=SECRET,
        callback_timeout_seconds=5.0,
    )


def verified(received: Received) -> Any:
    """What the producer does: raises unless the signature is right and the timestamp fresh."""
    return Webhook(SECRET).verify(received.body, received.headers)


async def delivered(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        callback = job.get("callback") or {}
        return job if callback.get("status") in ("delivered", "failed") else None

    job: dict[str, Any] = await wait_until(check, timeout=60)
    return job


async def test_succeeded_job_is_posted_once_signed(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, receiver: Receiver
) -> None:
    spawn.worker([queue])
    job = await submit(
        client,
        {
            "type": "demo.echo",
            "queue": queue,
            "payload": {"n": 1},
            "callback_url": receiver.url("ok"),
        },
    )
    assert job["callback"] == {"status": "waiting", "attempts": 0, "last_error": None}
    assert job["callback_url"] == receiver.url("ok")
    done = await delivered(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["callback"] == {"status": "delivered", "attempts": 1, "last_error": None}
    [post] = receiver.seen["ok"]
    body = verified(post)
    assert post.headers["webhook-id"] == f"{job['id']}_1"
    assert body["id"] == job["id"] and body["type"] == "demo.echo"
    assert body["status"] == "succeeded" and body["result"] == {"n": 1}
    assert body["error"] is None and body["attempts"] == 1
    assert body["finished_at"] and body["created_at"] and body["started_at"]
    # a tampered body or another secret does not verify
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(post.body + b" ", post.headers)
    other = "whsec_" + base64.b64encode(b"another-key").decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other).verify(post.body, post.headers)


async def test_receiver_that_fails_twice_gets_it_on_the_third_try(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, receiver: Receiver
) -> None:
    receiver.fail["flaky"] = 2
    spawn.worker([queue])
    job = await submit(
        client, {"type": "demo.echo", "queue": queue, "callback_url": receiver.url("flaky")}
    )
    done = await delivered(client, job["id"])
    assert done["callback"] == {"status": "delivered", "attempts": 3, "last_error": "HTTP 500"}
    assert done["status"] == "succeeded"  # the callback never changes the outcome
    posts = receiver.seen["flaky"]
    assert len(posts) == 3
    assert {p.headers["webhook-id"] for p in posts} == {f"{job['id']}_1"}
    assert [verified(p)["status"] for p in posts] == ["succeeded"] * 3


async def test_dead_and_cancelled_jobs_are_posted_with_their_error(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, receiver: Receiver
) -> None:
    spawn.worker([queue])
    dead = await submit(
        client,
        {
            "type": "demo.fail",
            "queue": queue,
            "max_attempts": 1,
            "payload": {"message": "boom"},
            "callback_url": receiver.url("dead"),
        },
    )
    waiting = await submit(
        client,
        {
            "type": "demo.echo",
            "queue": queue,
            "delay_seconds": 3600,
            "callback_url": receiver.url("cancelled"),
        },
    )
    cancelled = await client.post(f"/v1/jobs/{waiting['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    done_dead = await delivered(client, dead["id"])
    done_cancelled = await delivered(client, waiting["id"])
    assert done_dead["status"] == "dead" and done_cancelled["status"] == "cancelled"
    dead_body = verified(receiver.seen["dead"][0])
    assert dead_body["status"] == "dead" and "boom" in dead_body["error"]
    assert dead_body["result"] is None
    cancelled_body = verified(receiver.seen["cancelled"][0])
    assert cancelled_body["status"] == "cancelled" and cancelled_body["attempts"] == 0


async def test_a_delivery_held_by_a_crashed_worker_is_made_again(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, receiver: Receiver
) -> None:
    """A worker took the delivery (attempt 1) and died before sending it: once its lease is
    over, a live worker delivers it (attempt 2)."""
    job = await submit(
        client, {"type": "demo.echo", "queue": queue, "callback_url": receiver.url("crash")}
    )
    await client.post(f"/v1/jobs/{job['id']}/cancel")
    pool = await create_pool(settings, max_size=1)
    try:
        async with pool.acquire() as conn:
            [taken] = await callbacks.take_due(conn, [queue], 10, lease_seconds=2.0)
    finally:
        await pool.close()
    assert taken.id.hex == job["id"].replace("-", "") and taken.attempt == 1
    spawn.worker([queue])
    done = await delivered(client, job["id"])
    assert done["callback"]["status"] == "delivered" and done["callback"]["attempts"] == 2
    assert len(receiver.seen["crash"]) == 1
    assert verified(receiver.seen["crash"][0])["status"] == "cancelled"


async def test_retries_stop_after_the_retry_window(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, receiver: Receiver
) -> None:
    receiver.fail["down"] = 1000
    spawn.worker([queue], settings=settings.model_copy(update={"callback_retry_seconds": 3.0}))
    job = await submit(
        client, {"type": "demo.echo", "queue": queue, "callback_url": receiver.url("down")}
    )
    done = await delivered(client, job["id"])
    assert done["callback"]["status"] == "failed"
    assert done["callback"]["last_error"] == "HTTP 500"
    tries = len(receiver.seen["down"])
    assert done["callback"]["attempts"] == tries >= 1
    assert done["status"] == "succeeded"
    # given up: nothing more is sent (backoff is at most retry_max_seconds, 2 s here)
    await asyncio.sleep(3)
    assert len(receiver.seen["down"]) == tries


async def test_refused_destinations(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    """Not on the allow-list or not an http(s) URL: 422 at submit. Allowed by a wildcard but
    resolving to a private address: the delivery fails for good (SSRF guard)."""
    for url in (
        "http://169.254.169.254/latest",
        "http://127.0.0.1:1/other-port",
        "ftp://127.0.0.1/x",
        "http://user:pw@127.0.0.1/",
        "not a url",
    ):
        response = await client.post(
            "/v1/jobs", json={"type": "demo.echo", "queue": queue, "callback_url": url}
        )
        assert response.status_code == 422, (url, response.text)
    spawn.worker([queue], settings=settings.model_copy(update={"http_allowed_hosts": "*"}))
    wildcard = settings.model_copy(update={"http_allowed_hosts": "*"})
    from app.main import create_app  # an API allowing any host at submit

    app = create_app(wildcard)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=client.headers
        ) as api:
            job = await submit(
                api,
                {"type": "demo.echo", "queue": queue, "callback_url": "http://127.0.0.1:9/"},
            )
            done = await delivered(api, job["id"])
    assert done["callback"]["status"] == "failed"
    assert done["callback"]["attempts"] == 1
    assert done["callback"]["last_error"].startswith("blocked_destination")


async def test_replayed_job_gets_a_new_turn(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, receiver: Receiver
) -> None:
    spawn.worker([queue])
    ready = await submit(client, {"type": "demo.echo", "queue": queue})
    await wait_for_status(client, ready["id"], {"succeeded"}, timeout=60)  # the worker runs
    until = datetime.now(UTC) + timedelta(seconds=2)
    job = await submit(
        client,
        {
            "type": "demo.fail",
            "queue": queue,
            "max_attempts": 1,
            "payload": {"fail_until": until.isoformat()},
            "callback_url": receiver.url("turns"),
        },
    )
    assert (await delivered(client, job["id"]))["status"] == "dead"
    await asyncio.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.1)
    replay = await client.post(f"/v1/dlq/{job['id']}/replay")
    assert replay.status_code == 202, replay.text
    await wait_for_status(client, job["id"], {"succeeded"}, timeout=60)

    async def two() -> list[Received] | None:
        seen = receiver.seen.get("turns", [])
        return seen if len(seen) == 2 else None

    first, second = await wait_until(two, timeout=60)
    assert [first.headers["webhook-id"], second.headers["webhook-id"]] == [
        f"{job['id']}_1",
        f"{job['id']}_2",
    ]
    assert [verified(first)["status"], verified(second)["status"]] == ["dead", "succeeded"]
    assert json.loads(second.body)["result"] == {"attempt": 1}


async def test_the_callback_url_is_part_of_an_idempotent_request(
    client: httpx.AsyncClient, queue: str, receiver: Receiver
) -> None:
    body = {
        "type": "demo.echo",
        "queue": queue,
        "delay_seconds": 3600,
        "idempotency_key": f"k-{queue}",
        "callback_url": receiver.url("a"),
    }
    first = await client.post("/v1/jobs", json=body)
    again = await client.post("/v1/jobs", json=body)
    other = await client.post("/v1/jobs", json={**body, "callback_url": receiver.url("b")})
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 409)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["callback"] == {"status": "waiting", "attempts": 0, "last_error": None}
    plain = {k: v for k, v in body.items() if k != "callback_url"} | {
        "idempotency_key": f"p-{queue}"
    }
    assert (await client.post("/v1/jobs", json=plain)).status_code == 202
    nulled = await client.post("/v1/jobs", json={**plain, "callback_url": None})
    assert nulled.status_code == 200  # null is the same as no callback
