"""The error table: what each backend failure becomes on the wire."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DataError, OperationalError

from app import errors as app_errors
from app.api import errors
from app.api.limits import BodyLimits
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends
from tests.support.db import scratch_database


def _app() -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.get("/data")
    async def data() -> None:
        raise DataError("INSERT ...", {"secret": "canary"}, Exception("invalid byte sequence"))

    @app.get("/down")
    async def down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    return app


async def test_refused_value_is_422_and_unreachable_database_is_503() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.get("/data")
        assert refused.status_code == 422
        assert refused.json()["error"] == "invalid"
        assert "canary" not in refused.text
        down = await client.get("/down")
        assert down.status_code == 503
        assert down.headers["retry-after"]
        assert down.json()["error"] == "unavailable"


def _domain_classes() -> list[type[app_errors.ConveyorError]]:
    found, stack = [], [app_errors.ConveyorError]
    while stack:
        cls = stack.pop()
        found += cls.__subclasses__()
        stack += cls.__subclasses__()
    return [c for c in found if c.__module__ == app_errors.__name__]


def test_one_tree_one_table() -> None:
    """Every domain error has one status in the table, is documented for OpenAPI under that
    status, and is drawn in the tree of ``app/errors.py``; no other error type carries a
    status of its own."""
    classes = _domain_classes()
    assert set(classes) == set(errors.TABLE)
    for cls in classes:
        status = errors.STATUS[cls]
        assert errors.ERRORS[status]["description"]
        assert f"{cls.__name__} " in (app_errors.__doc__ or ""), cls
        assert f"{status}  " in (app_errors.__doc__ or "").split(cls.__name__, 1)[1].split("\n")[0]
    assert len(set(errors.STATUS.values())) == len(classes)  # one class per status


async def test_middleware_rejections_are_domain_errors() -> None:
    """The body limits answer with the domain tree's codes (413 also closes the connection)."""
    app = FastAPI()
    errors.install(app)

    @app.post("/echo")
    async def echo() -> dict[str, bool]:
        return {"ok": True}

    limited = BodyLimits(app, max_bytes=1024)
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        big = await client.post("/echo", content=b"[" + b"1," * 1000 + b"1]")
        assert (big.status_code, big.json()["error"]) == (413, "payload_too_large")
        assert big.headers["connection"] == "close"
        text = await client.post("/echo", content=b"hi", headers={"content-type": "text/plain"})
        assert (text.status_code, text.json()["error"]) == (415, "unsupported_media_type")
        nan = await client.post(
            "/echo", content=b"[NaN]", headers={"content-type": "application/json"}
        )
        assert (nan.status_code, nan.json()["error"]) == (422, "invalid")
        ok = await client.post("/echo", json={"a": 1})
        assert ok.status_code == 200


async def test_invalid_content_length_is_400_bad_request() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the request must not reach the app")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "headers": [(b"content-length", b"12abc"), (b"content-type", b"application/json")],
    }
    await BodyLimits(app, max_bytes=1024)(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"] == "bad_request"


async def test_value_postgres_refuses_is_422_and_writes_nothing(
    client: httpx.AsyncClient, queue: str, settings: Settings
) -> None:
    """A payload that passes its type's model (a plain ``float`` takes the string "NaN") but
    that jsonb refuses (class 22): a 422 naming no internals, not a 503, and no row."""
    for value in ("NaN", "Infinity"):
        body = {"type": "test.measure", "queue": queue, "payload": {"value": value}}
        response = await client.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid"
        assert "retry-after" not in response.headers
        batch = await client.post("/v1/jobs/batch", json={"jobs": [body]})
        assert batch.status_code == 422, batch.text
    listed = (await client.get("/v1/jobs", params={"queue": queue})).json()
    assert listed["items"] == []


@pytest.fixture
def unmigrated(backends: Backends) -> Iterator[str]:
    """An empty database: the API pointed at it before anyone ran ``conveyor migrate``."""
    with scratch_database(backends.database_url, "conveyor_empty") as url:
        yield url


async def test_a_database_that_was_never_migrated_is_a_503_that_says_so(
    settings: Settings, unmigrated: str
) -> None:
    """Not a 500 with a stack trace: the operator's fix is named, and nothing is written."""
    app = create_app(settings.model_copy(update={"database_url": unmigrated}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as client:
            submitted = await client.post("/v1/jobs", json={"type": "demo.echo", "payload": {}})
            read = await client.get(f"/v1/jobs/{uuid.uuid4()}")
    for answer in (submitted, read):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "not_migrated"
        assert "conveyor migrate" in answer.json()["message"]
        assert answer.headers["retry-after"]
