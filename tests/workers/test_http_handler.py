"""The built-in `http.request` type, run by real workers against a local test server.

Only loopback traffic: the target is a Starlette app served by uvicorn in this process, and a
"canary" listener counts every connection that an SSRF attempt would make.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from app.devserver import free_port
from app.settings import Settings
from tests.conftest import wait_for_status
from tests.support.http_server import serving
from tests.support.processes import Spawner

SECRET = "test-signing-secret"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Target:
    """The test server: what it received, and its address."""

    port: int
    seen: list[Seen] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


def build_app(target: Target) -> Starlette:
    async def record(request: Request) -> Seen:
        seen = Seen(request.method, request.url.path, dict(request.headers), await request.body())
        target.seen.append(seen)
        return seen

    async def ok(request: Request) -> Response:
        seen = await record(request)
        return JSONResponse({"ok": True, "got": seen.body.decode()}, headers={"ETag": '"v1"'})

    async def status(request: Request) -> Response:
        await record(request)
        return PlainTextResponse("status body", status_code=int(request.path_params["code"]))

    async def flaky(request: Request) -> Response:
        """Fails with `code` the first time a key is seen, then succeeds."""
        await record(request)
        key = request.path_params["key"]
        target.calls[key] = target.calls.get(key, 0) + 1
        if target.calls[key] == 1:
            return PlainTextResponse("try later", status_code=int(request.path_params["code"]))
        return PlainTextResponse("fine now")

    async def redirect(request: Request) -> Response:
        await record(request)
        code = int(request.query_params.get("code", "302"))
        return RedirectResponse(request.query_params["to"], status_code=code)

    async def loop(request: Request) -> Response:
        await record(request)
        return RedirectResponse("/loop", status_code=302)

    async def big(request: Request) -> Response:
        await record(request)
        return PlainTextResponse("x" * 100_000)

    async def bomb(request: Request) -> Response:
        """Gzip whatever the client asked for: 20 MB of zeros in about 20 KB."""
        await record(request)
        return Response(
            gzip_bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    return Starlette(
        routes=[
            Route("/ok", ok, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/status/{code:int}", status, methods=["GET", "POST"]),
            Route("/flaky/{code:int}/{key}", flaky, methods=["POST"]),
            Route("/redirect", redirect, methods=["GET", "POST"]),
            Route("/big", big, methods=["GET"]),
            Route("/bomb", bomb, methods=["GET"]),
            Route("/loop", loop, methods=["PUT"]),
        ]
    )


@functools.cache
def gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * 20_000_000, compresslevel=9)


@contextlib.asynccontextmanager
async def serve() -> AsyncIterator[Target]:
    t = Target(free_port())
    async with serving(build_app(t), t.port):
        yield t


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    async with serve() as t:
        yield t


@pytest.fixture
async def other() -> AsyncIterator[Target]:
    """A second server: another origin (same address, another port)."""
    async with serve() as t:
        yield t


@dataclass
class Canary:
    port: int
    connections: int = 0


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    """A loopback listener that no job may ever reach."""
    c = Canary(0)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c.connections += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    c.port = server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def worker_settings(settings: Settings, allowed: str) -> Settings:
    return settings.model_copy(
        update={"http_allowed_hosts": allowed, "http_signing_secret": SECRET}
    )


async def run(
    client: httpx.AsyncClient, queue: str, payload: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        "/v1/jobs", json={"type": "http.request", "queue": queue, "payload": payload, **fields}
    )
    assert response.status_code == 202, response.text
    return await wait_for_status(client, response.json()["id"], {"succeeded", "dead"}, timeout=60)


def verify(seen: Seen, secret: str) -> bool:
    """What a receiver does: the Standard Webhooks library checks the signature headers (a
    secret without the ``whsec_`` prefix is the key's UTF-8 bytes)."""
    try:
        Webhook(secret.encode()).verify(seen.body, seen.headers, json_parse=False)
    except WebhookVerificationError:
        return False
    expected_id = f"{seen.headers['conveyor-job-id']}_{seen.headers['conveyor-attempt']}"
    return seen.headers["webhook-id"] == expected_id


async def test_success_carries_verifiable_signature(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, target: Target
) -> None:
    spawn.worker([queue], settings=worker_settings(settings, f"127.0.0.1:{target.port}"))
    payload = {
        "url": f"{target.base}/ok?x=1",
        "method": "POST",
        "headers": {"X-Custom": "yes"},
        "body": {"hello": "world"},
    }
    done = await run(client, queue, payload)
    assert done["status"] == "succeeded", done["errors"]
    assert done["attempts"] == 1
    result = done["result"]
    assert result["status"] == 200
    assert result["headers"]["content-type"] == "application/json"
    assert result["headers"]["etag"] == '"v1"'
    assert result["body_truncated"] is False
    assert '"got":"{\\"hello\\":\\"world\\"}"' in result["body"]
    [seen] = target.requests_to("/ok")
    assert seen.method == "POST"
    assert seen.body == b'{"hello":"world"}'
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-custom"] == "yes"
    assert seen.headers["host"] == f"127.0.0.1:{target.port}"
    assert seen.headers["conveyor-job-id"] == done["id"]
    assert seen.headers["conveyor-attempt"] == "1"
    assert verify(seen, SECRET)
    assert not verify(seen, "another-secret")
    tampered = Seen(seen.method, seen.path, seen.headers, seen.body + b" ")
    assert not verify(tampered, SECRET)

    text_body = await run(client, queue, {"url": f"{target.base}/ok", "body": "plain words"})
    bodiless = await run(client, queue, {"url": f"{target.base}/ok", "method": "DELETE"})
    assert text_body["status"] == bodiless["status"] == "succeeded"
    plain, delete = target.requests_to("/ok")[1:]
    assert plain.body == b"plain words" and plain.headers["content-type"].startswith("text/plain")
    assert delete.method == "DELETE" and delete.body == b""
    assert verify(plain, SECRET) and verify(delete, SECRET)

    big = await run(client, queue, {"url": f"{target.base}/big", "method": "GET"})
    assert big["status"] == "succeeded"
    assert big["result"]["body_truncated"] is True
    assert len(big["result"]["body"]) == 64 * 1024


async def test_5xx_408_429_retry_then_succeed(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, target: Target
) -> None:
    spawn.worker([queue], settings=worker_settings(settings, f"127.0.0.1:{target.port}"))
    for code in (500, 503, 408, 429):
        done = await run(client, queue, {"url": f"{target.base}/flaky/{code}/k{code}"})
        assert done["status"] == "succeeded", (code, done["errors"])
        assert done["attempts"] == 2
        assert done["errors"][0]["error"].startswith(f"HTTP {code} from 127.0.0.1")
        assert done["result"]["body"] == "fine now"
        first, second = target.requests_to(f"/flaky/{code}/k{code}")
        assert (first.headers["conveyor-attempt"], second.headers["conveyor-attempt"]) == (
            "1",
            "2",
        )
        assert verify(first, SECRET) and verify(second, SECRET)


async def test_other_4xx_fail_permanently(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, target: Target
) -> None:
    spawn.worker([queue], settings=worker_settings(settings, f"127.0.0.1:{target.port}"))
    for code in (404, 400, 410):
        done = await run(client, queue, {"url": f"{target.base}/status/{code}"}, max_attempts=5)
        assert done["status"] == "dead"
        assert done["attempts"] == 1, "a permanent failure takes no further attempts"
        assert done["errors"][0]["error"] == f"HTTP {code} from 127.0.0.1: status body"
        assert done["errors"][0]["type"] == "PermanentError"


async def test_network_errors_retry(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str
) -> None:
    closed = free_port()
    spawn.worker([queue], settings=worker_settings(settings, f"127.0.0.1:{closed}"))
    done = await run(client, queue, {"url": f"http://127.0.0.1:{closed}/"}, max_attempts=2)
    assert done["status"] == "dead"
    assert done["attempts"] == 2, "a refused connection is retried"
    assert all(e["error"].startswith("ConnectError") for e in done["errors"])


async def test_unlisted_hosts_are_refused_without_connecting(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, canary: Canary
) -> None:
    listed = f"127.0.0.1:{canary.port + 1 if canary.port < 65535 else canary.port - 1}"
    spawn.worker([queue], settings=worker_settings(settings, f"{listed},*.example.invalid"))
    for url in (
        f"http://localhost:{canary.port}/",  # another name for a listed address
        f"http://127.0.0.1:{canary.port}/",  # a listed host on another port
        f"http://2130706433:{canary.port}/",
        f"http://[::ffff:127.0.0.1]:{canary.port}/",
    ):
        done = await run(client, queue, {"url": url}, max_attempts=3)
        assert done["status"] == "dead", url
        assert done["attempts"] == 1
        assert done["errors"][0]["error"].startswith("blocked_destination"), url
        assert done["errors"][0]["type"] == "BlockedDestination"
    assert canary.connections == 0


async def test_off_unless_hosts_are_listed(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, target: Target
) -> None:
    spawn.worker([queue], settings=worker_settings(settings, ""))
    done = await run(client, queue, {"url": f"{target.base}/ok"})
    assert done["status"] == "dead"
    assert done["errors"][0]["error"].startswith("blocked_destination")
    assert target.seen == []


async def test_wildcard_never_reaches_private_addresses(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, canary: Canary
) -> None:
    """`*` allows any host, but only at public addresses, however the address is spelled."""
    spawn.worker([queue], settings=worker_settings(settings, "*"))
    for host in (
        "127.0.0.1",
        "localhost",
        "2130706433",
        "0x7f000001",
        "017700000001",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "169.254.169.254",
        "10.0.0.1",
        "0.0.0.0",
    ):
        done = await run(client, queue, {"url": f"http://{host}:{canary.port}/"})
        assert done["status"] == "dead", host
        assert done["errors"][0]["error"].startswith("blocked_destination"), host
    assert canary.connections == 0


async def test_redirects_are_checked_at_every_hop(
    client: httpx.AsyncClient,
    spawn: Spawner,
    settings: Settings,
    queue: str,
    target: Target,
    canary: Canary,
) -> None:
    spawn.worker([queue], settings=worker_settings(settings, f"127.0.0.1:{target.port}"))
    to_ok = httpx.URL(f"{target.base}/redirect", params={"to": f"{target.base}/ok", "code": 307})
    followed = await run(client, queue, {"url": str(to_ok), "body": "kept"})
    assert followed["status"] == "succeeded"
    assert followed["result"]["status"] == 200
    assert target.requests_to("/ok")[-1].body == b"kept"  # 307 keeps method and body
    assert verify(target.requests_to("/ok")[-1], SECRET)

    see_other = httpx.URL(
        f"{target.base}/redirect", params={"to": f"{target.base}/ok", "code": 303}
    )
    await run(client, queue, {"url": str(see_other), "body": "dropped"})
    last = target.requests_to("/ok")[-1]
    assert (last.method, last.body) == ("GET", b"")

    for elsewhere in (f"http://localhost:{canary.port}/", f"http://127.0.0.1:{canary.port}/"):
        away = httpx.URL(f"{target.base}/redirect", params={"to": elsewhere})
        done = await run(client, queue, {"url": str(away)}, max_attempts=3)
        assert done["status"] == "dead"
        assert done["attempts"] == 1
        assert done["errors"][0]["error"].startswith("blocked_destination")
    looping = await run(client, queue, {"url": f"{target.base}/loop", "method": "PUT"})
    assert looping["status"] == "dead"
    assert looping["errors"][0]["error"] == "more than 5 redirects"
    assert len(target.requests_to("/loop")) == 6
    assert canary.connections == 0


async def test_cross_origin_redirects_drop_the_jobs_headers_and_the_signature(
    client: httpx.AsyncClient,
    spawn: Spawner,
    settings: Settings,
    queue: str,
    target: Target,
    other: Target,
) -> None:
    allowed = f"127.0.0.1:{target.port},127.0.0.1:{other.port}"
    spawn.worker([queue], settings=worker_settings(settings, allowed))
    headers = {"X-Api-Key": "job-secret", "Authorization": "Bearer job-token", "X-Custom": "yes"}

    def redirect(server: Target, to: str) -> str:
        return str(httpx.URL(f"{server.base}/redirect", params={"to": to, "code": 307}))

    # on the job's own origin the job's headers follow, and each hop is signed
    done = await run(
        client, queue, {"url": redirect(target, f"{target.base}/ok"), "headers": headers}
    )
    assert done["status"] == "succeeded"
    first, last = target.requests_to("/redirect")[-1], target.requests_to("/ok")[-1]
    for seen in (first, last):
        assert seen.headers["x-api-key"] == "job-secret" and verify(seen, SECRET)

    # another origin gets none of the job's headers and no signature, but the body (307)
    done = await run(
        client,
        queue,
        {"url": redirect(target, f"{other.base}/ok"), "headers": headers, "body": "kept"},
    )
    assert done["status"] == "succeeded"
    [away] = other.requests_to("/ok")
    assert verify(target.requests_to("/redirect")[-1], SECRET)
    for name in ("x-api-key", "authorization", "x-custom", "webhook-signature"):
        assert name not in away.headers, name
    assert not verify(away, SECRET)
    assert away.body == b"kept" and away.headers["content-type"].startswith("text/plain")
    assert away.headers["conveyor-job-id"] == done["id"]

    # and once the chain has left the job's origin, coming back does not restore them
    back = redirect(other, f"{target.base}/ok")
    done = await run(client, queue, {"url": redirect(target, back), "headers": headers})
    assert done["status"] == "succeeded"
    returned = target.requests_to("/ok")[-1]
    assert "x-api-key" not in returned.headers and "webhook-signature" not in returned.headers


async def test_responses_are_never_decompressed(
    client: httpx.AsyncClient, spawn: Spawner, settings: Settings, queue: str, target: Target
) -> None:
    """The body cap holds for the bytes received: a gzip bomb is not inflated in the worker."""
    spawn.worker([queue], settings=worker_settings(settings, f"127.0.0.1:{target.port}"))
    done = await run(client, queue, {"url": f"{target.base}/bomb", "method": "GET"})
    assert done["status"] == "succeeded", done["errors"]
    [seen] = target.requests_to("/bomb")
    assert seen.headers["accept-encoding"] == "identity"
    result = done["result"]
    assert result["body_truncated"] is False, "the compressed bytes fit under the cap"
    assert len(result["body"]) <= len(gzip_bomb())


async def test_payload_is_validated_at_submit(client: httpx.AsyncClient, queue: str) -> None:
    bad_payloads: list[dict[str, Any]] = [
        {},
        {"url": "ftp://127.0.0.1/file"},
        {"url": "file:///etc/passwd"},
        {"url": "javascript:alert(1)"},
        {"url": "http://user:pass@127.0.0.1/"},
        {"url": "http://127.0.0.1/", "method": "TRACE"},
        {"url": "http://127.0.0.1/", "timeout_seconds": 301},
        {"url": "http://127.0.0.1/", "timeout_seconds": 0},
        {"url": "http://127.0.0.1/", "headers": {"Host": "evil"}},
        {"url": "http://127.0.0.1/", "headers": {"Conveyor-Signature": "forged"}},
        {"url": "http://127.0.0.1/", "headers": {"Webhook-Signature": "v1,forged"}},
        {"url": "http://127.0.0.1/", "headers": {"Accept-Encoding": "gzip"}},
        {"url": "http://127.0.0.1/", "headers": {"X-Split": "a\r\nInjected: 1"}},
        {"url": "http://127.0.0.1/", "body": ["a", "list"]},
        {"url": "http://127.0.0.1/", "extra": 1},
    ]
    for payload in bad_payloads:
        response = await client.post(
            "/v1/jobs", json={"type": "http.request", "queue": queue, "payload": payload}
        )
        assert response.status_code == 422, payload
    ok = await client.post(
        "/v1/jobs",
        json={
            "type": "http.request",
            "queue": queue,
            "payload": {"url": "https://example.com/hook"},
            "delay_seconds": 3600,
        },
    )
    assert ok.status_code == 202
    assert ok.json()["payload"] == {
        "url": "https://example.com/hook",
        "method": "POST",
        "headers": {},
        "body": None,
        "timeout_seconds": 30.0,
    }
    types = {t["name"]: t for t in (await client.get("/v1/job-types")).json()["items"]}
    assert "webhook-signature" in types["http.request"]["description"]
    assert (
        types["http.request"]["payload_schema"]["properties"]["timeout_seconds"]["maximum"] == 300
    )
