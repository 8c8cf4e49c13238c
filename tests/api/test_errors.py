"""The error table: what each backend failure becomes on the wire."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy.exc import DataError, OperationalError

from app.api import errors


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
