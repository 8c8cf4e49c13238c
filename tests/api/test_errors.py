"""The error table: what each backend failure becomes on the wire."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy.exc import DataError, OperationalError

from app.api import errors
from app.settings import Settings


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
