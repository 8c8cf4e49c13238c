"""Body limits: size (413, before buffering), media type (415), JSON depth and values (422).

Every rejection must be a 4xx with the ``{"error", "message", "details"}`` body and must write
nothing (jobs and job_events rows and job states compared by SQL before and after).
"""

from __future__ import annotations

import json
import select
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from starlette.types import Message

from app.api.limits import MAX_DEPTH, BodyLimits, json_depth_exceeds
from app.settings import Settings
from tests.security.conftest import Database
from tests.support.processes import Spawner

MiB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code
    return body


def job(payload_json: str, queue: str = "default") -> bytes:
    """A submission whose payload is the given JSON text, spliced in verbatim."""
    return f'{{"type": "demo.echo", "queue": "{queue}", "payload": {payload_json}}}'.encode()


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


async def post(client: httpx.AsyncClient, content: bytes, **headers: str) -> httpx.Response:
    return await client.post("/v1/jobs", content=content, headers={**JSON, **headers})


# --- size ---


@pytest.mark.parametrize("size", [1 * MiB, 10 * MiB], ids=["1MiB", "10MiB"])
async def test_bodies_over_the_limit_are_413_and_write_nothing(
    client: httpx.AsyncClient, db: Database, settings: Settings, queue: str, size: int
) -> None:
    filler = "x" * size
    before = await db.snapshot()
    response = await post(client, job(json.dumps({"blob": filler}), queue))
    body = assert_error(response, 413, "payload_too_large")
    assert body["details"] == {"max_bytes": settings.max_payload_bytes}
    assert await db.snapshot() == before


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient, db: Database) -> None:
    async def chunks() -> Any:
        yield b'{"type": "demo.echo", "payload": {"blob": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}}'

    before = await db.snapshot()
    response = await client.post("/v1/jobs", content=chunks(), headers=JSON)
    assert_error(response, 413, "payload_too_large")
    assert await db.snapshot() == before


async def test_body_just_under_the_limit_is_accepted(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    frame = job(json.dumps({"blob": ""}), queue)
    content = job(json.dumps({"blob": "z" * (settings.max_payload_bytes - len(frame))}), queue)
    assert len(content) == settings.max_payload_bytes
    assert (await post(client, content)).status_code == 202
    assert (await post(client, content + b" ")).status_code == 413


async def test_middleware_stops_reading_a_stream_once_past_the_limit() -> None:
    """Driven directly over ASGI: an endless body is read only up to the limit."""
    received = 0

    async def endless() -> dict[str, Any]:
        nonlocal received
        received += 4096
        return {"type": "http.request", "body": b" " * 4096, "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not be called")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
    }
    await BodyLimits(app, max_bytes=64 * 1024)(scope, endless, send)
    assert sent[0]["status"] == 413
    assert received <= 64 * 1024 + 4096


def _send_chunked(url: str, total: int) -> bytes:
    """POST ``total`` bytes chunked over a raw socket; stop sending once a response arrives."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: conveyor\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (65536, b"w" * 65536)
        sent = 0
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += 65536
        except OSError:
            pass  # the server closed its side after answering
        response = b""
        try:
            while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except OSError:
            pass
        return response


def _peak_rss_since_reset(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_ten_mib_chunked_to_a_real_api_is_413_without_growing_its_memory(
    spawn: Spawner,
) -> None:
    proc, url = spawn.api()
    api = psutil.Process(proc.pid)
    # Warm up with small over-limit bodies only: a 10 MiB warm-up that was buffered would leave
    # its memory in the allocator, and the measured sends would then reuse it unnoticed. (With
    # the limit raised to 64 MiB, this measures about 10.6 MiB of growth for one 10 MiB body.)
    for _ in range(2):
        assert _send_chunked(url, MiB // 2).startswith(b"HTTP/1.1 413")
    baseline = api.memory_info().rss
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    for _ in range(3):
        response = _send_chunked(url, 10 * MiB)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b'"error":"payload_too_large"' in response
    growth = _peak_rss_since_reset(proc.pid) - baseline
    print(f"peak RSS growth over three 10 MiB chunked bodies: {growth / MiB:.2f} MiB")
    assert growth < 5 * MiB
    with httpx.Client(base_url=url) as c:  # the server still works normally
        assert c.get("/healthz").status_code == 200


# --- media type ---


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}],
    ids=["text", "form", "none"],
)
async def test_non_json_bodies_are_415(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    before = await db.snapshot()
    response = await client.post("/v1/jobs", content=b'{"type": "demo.echo"}', headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert await db.snapshot() == before


@pytest.mark.parametrize("media", ["application/json; charset=utf-8", "application/vnd.api+json"])
async def test_json_media_types_are_accepted(
    client: httpx.AsyncClient, queue: str, media: str
) -> None:
    response = await post(client, job("{}", queue), **{"Content-Type": media})
    assert response.status_code == 202, response.text


async def test_post_without_a_body_needs_no_content_type_from_a_client(
    client: httpx.AsyncClient,
) -> None:
    """No body, no Content-Type: accepted from Conveyor's own clients, which send
    X-Requested-With (without it, auth off: 415, see test_cross_site.py)."""
    submitted = (await client.post("/v1/jobs", json={"type": "demo.echo"})).json()
    response = await client.post(f"/v1/jobs/{submitted['id']}/cancel")
    assert response.status_code == 200, response.text


# --- depth ---


@pytest.mark.parametrize(
    "document",
    [nested(MAX_DEPTH), "[" * 10_000 + "]" * 10_000, nested(10_000), "[" * 100_000],
    ids=["33-levels", "10000-arrays", "10000-objects", "unclosed-100000"],
)
async def test_too_deep_json_is_422_and_writes_nothing(
    client: httpx.AsyncClient, db: Database, document: str
) -> None:
    before = await db.snapshot()
    body = assert_error(await post(client, job(document)), 422, "invalid")
    assert body["details"][0]["type"] == "json_too_deep"
    assert await db.snapshot() == before


async def test_nesting_up_to_the_limit_is_accepted(client: httpx.AsyncClient, queue: str) -> None:
    # the submission object and the payload are two levels; the payload holds the rest
    response = await post(client, job(nested(MAX_DEPTH - 2), queue))
    assert response.status_code == 202, response.text


async def test_brackets_inside_strings_do_not_count(client: httpx.AsyncClient, queue: str) -> None:
    text = '[{"\\"[' * 5000
    response = await client.post(
        "/v1/jobs", json={"type": "demo.echo", "queue": queue, "payload": {"text": text}}
    )
    assert response.status_code == 202, response.text
    assert response.json()["payload"] == {"text": text}


def test_depth_scan_is_linear_on_hostile_strings() -> None:
    """An unterminated string full of escaped quotes (quadratic for a backtracking regex)."""
    assert not json_depth_exceeds(b'"' + b'\\"' * 200_000, 32)
    assert json_depth_exceeds(b'["\\\\", ' * 40, 32)
    assert not json_depth_exceeds(b'["\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]', 32)


# --- malformed JSON and values the database cannot store ---

BAD_JSON = {
    "truncated": b'{"type": "demo.echo",',
    "trailing_comma": b'{"type": "demo.echo",}',
    "single_quotes": b"{'type': 'demo.echo'}",
    "garbage": b"\x00\x01\x02",
    "not_utf8": b'{"type": "demo.echo", "payload": {"k": "\xff\xfe"}}',
    "utf16": '{"type": "demo.echo"}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"type": "demo.echo"}',
    "two_documents": b'{"type": "demo.echo"}{"type": "demo.echo"}',
    "raw_control_char": b'{"type": "demo.echo", "payload": {"k": "a\x01b"}}',
}


@pytest.mark.parametrize("content", list(BAD_JSON.values()), ids=list(BAD_JSON))
async def test_malformed_json_is_422_and_writes_nothing(
    client: httpx.AsyncClient, db: Database, content: bytes
) -> None:
    before = await db.snapshot()
    assert_error(await post(client, content), 422, "invalid")
    assert await db.snapshot() == before


BAD_VALUES = {
    "overflow": '{"n": 1e400}',
    "negative_overflow": '{"n": -1e400}',
    "nan": '{"n": NaN}',
    "infinity": '{"n": Infinity}',
    "minus_infinity": '{"n": -Infinity}',
    "lone_high_surrogate": '{"s": "\\ud800"}',
    "lone_low_surrogate": '{"s": "x\\udc00y"}',
    "surrogate_in_key": '{"\\ud800": 1}',
    "nul_value": '{"s": "a\\u0000b"}',
    "nul_key": '{"a\\u0000": 1}',
    "nul_in_array": '{"s": ["ok", ["\\u0000"]]}',
    "duplicate_key": '{"a": 1, "a": 2}',
    "huge_integer": '{"n": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("payload", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
async def test_unstorable_values_are_422_and_write_nothing(
    client: httpx.AsyncClient, db: Database, payload: str
) -> None:
    before = await db.snapshot()
    body = assert_error(await post(client, job(payload)), 422, "invalid")
    assert payload not in json.dumps(body)
    assert await db.snapshot() == before


async def test_duplicate_top_level_field_is_422(client: httpx.AsyncClient, db: Database) -> None:
    before = await db.snapshot()
    content = b'{"type": "demo.echo", "type": "demo.sleep"}'
    assert_error(await post(client, content), 422, "invalid")
    assert await db.snapshot() == before


async def test_valid_surrogate_pairs_and_escapes_round_trip(
    client: httpx.AsyncClient, queue: str
) -> None:
    response = await post(client, job('{"s": "\\ud83d\\ude00 \\u00e9 \\\\u0000 tab\\t"}', queue))
    assert response.status_code == 202, response.text
    assert response.json()["payload"] == {"s": "\U0001f600 \u00e9 \\u0000 tab\t"}


# --- huge arrays ---


@pytest.mark.parametrize("n", [10_000, 100_000])
async def test_huge_arrays_are_accepted_when_they_fit(
    client: httpx.AsyncClient, settings: Settings, queue: str, n: int
) -> None:
    content = job(json.dumps({"items": list(range(n))}), queue)
    response = await post(client, content)
    if len(content) <= settings.max_payload_bytes:
        assert response.status_code == 202, response.text
        got = await client.get(f"/v1/jobs/{response.json()['id']}")
        assert len(got.json()["payload"]["items"]) == n
    else:
        assert_error(response, 413, "payload_too_large")


async def test_batch_of_many_jobs_is_never_a_server_error(
    client: httpx.AsyncClient, queue: str
) -> None:
    jobs = [{"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(1000)]
    assert (await client.post("/v1/jobs/batch", json={"jobs": jobs})).status_code == 202
    too_many = {"jobs": jobs + jobs[:1]}
    assert_error(await client.post("/v1/jobs/batch", json=too_many), 422, "invalid")


# --- every error has the same JSON shape ---


async def test_unknown_paths_and_methods_get_json_errors(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/no-such-page"), 404, "not_found")
    wrong_method = await client.put("/v1/jobs", json={})
    assert_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]
    assert_error(await client.get("/v1/jobs/not-a-uuid"), 422, "invalid")
    assert_error(await client.get("/v1/jobs", params={"limit": "lots"}), 422, "invalid")
    assert_error(await client.get("/v1/jobs", params={"cursor": "%%%"}), 422, "invalid")
