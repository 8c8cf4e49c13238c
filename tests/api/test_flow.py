"""The flow-control endpoints: pause/resume, limits per queue and job type, their listings,
and every bad input answered with a 4xx that writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.flow.limits import Limits, parse_rate
from app.settings import Settings
from tests.conftest import Backends, make_settings
from tests.support import db

HANDLERS = "tests.support.handlers,tests.support.limited_handlers"


@pytest.fixture
def settings(backends: Backends) -> Settings:
    return make_settings(backends, handler_modules=HANDLERS)


@pytest.fixture
async def clean(client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """Overrides of the shared test types are dropped again (other tests rely on them)."""
    try:
        yield client
    finally:
        for name in ("test.limited", "test.rated"):
            await client.delete(f"/v1/job-types/{name}/limits")


async def _type_limits(client: httpx.AsyncClient) -> dict[str, Any]:
    items = (await client.get("/v1/job-types")).json()["items"]
    return {t["name"]: t["limits"] for t in items}


async def _queues(client: httpx.AsyncClient) -> dict[str, Any]:
    return {q["queue"]: q for q in (await client.get("/v1/queues")).json()["items"]}


async def test_declared_limits_are_listed_and_an_override_replaces_them(
    clean: httpx.AsyncClient,
) -> None:
    client = clean
    limits = await _type_limits(client)
    assert limits["test.limited"] == {
        "concurrency": 2,
        "rate": None,
        "burst": None,
        "source": "code",
    }
    assert limits["test.rated"] == {
        "concurrency": None,
        "rate": "20/s",
        "burst": 5,
        "source": "code",
    }
    assert limits["test.nap"]["source"] == "none"

    body = {"concurrency": 5, "rate": "10/m", "burst": None}
    response = await client.put("/v1/job-types/test.limited/limits", json=body)
    assert response.status_code == 200, response.text
    expected = {"concurrency": 5, "rate": "10/m", "burst": 10, "source": "api"}
    assert response.json() == {"type": "test.limited", **expected}
    assert (await _type_limits(client))["test.limited"] == expected

    # An override with nulls lifts the declared limits.
    response = await client.put("/v1/job-types/test.rated/limits", json={})
    assert response.json()["rate"] is None and response.json()["source"] == "api"

    response = await client.delete("/v1/job-types/test.limited/limits")
    assert response.status_code == 200
    assert response.json()["source"] == "code" and response.json()["concurrency"] == 2
    assert (await _type_limits(client))["test.limited"]["concurrency"] == 2


async def test_queue_limits_and_pause_are_listed_even_without_jobs(
    client: httpx.AsyncClient, queue: str
) -> None:
    assert queue not in await _queues(client)
    response = await client.post(f"/v1/queues/{queue}/pause")
    assert response.status_code == 200 and response.json() == {"queue": queue, "paused": True}
    listed = (await _queues(client))[queue]
    assert listed["paused"] is True and listed["waiting"] == 0

    body = {"concurrency": 3, "rate": "100/h", "burst": 7}
    response = await client.put(f"/v1/queues/{queue}/limits", json=body)
    expected = {"concurrency": 3, "rate": "100/h", "burst": 7, "source": "api"}
    assert response.status_code == 200 and response.json() == {"queue": queue, **expected}
    assert (await _queues(client))[queue]["limits"] == expected

    response = await client.post(f"/v1/queues/{queue}/resume")
    assert response.status_code == 200 and response.json() == {"queue": queue, "paused": False}
    assert (await _queues(client))[queue]["paused"] is False  # still listed: it has limits
    await client.delete(f"/v1/queues/{queue}/limits")
    assert queue not in await _queues(client)


BAD_BODIES = [
    {"concurrency": 0},
    {"concurrency": -1},
    {"concurrency": "many"},
    {"concurrency": 1.5},
    {"concurrency": 10**7},
    {"rate": "0/s"},
    {"rate": "10/d"},
    {"rate": "ten/s"},
    {"rate": "10"},
    {"rate": 10},
    {"rate": "-1/s"},
    {"burst": 5},  # a burst needs a rate
    {"rate": "5/s", "burst": 0},
    {"unknown": 1},
    [],
    "10/s",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=str)
async def test_bad_limits_are_422_and_write_nothing(
    client: httpx.AsyncClient, settings: Settings, queue: str, body: Any
) -> None:
    count = "SELECT count(*) FROM flow_controls"
    before = await db.fetch(settings.database_url, count)
    for path in (f"/v1/queues/{queue}/limits", "/v1/job-types/test.limited/limits"):
        response = await client.put(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]
    assert await db.fetch(settings.database_url, count) == before


async def test_unknown_type_is_404_and_bad_names_are_422(client: httpx.AsyncClient) -> None:
    response = await client.put("/v1/job-types/no.such.type/limits", json={"concurrency": 1})
    assert response.status_code == 404
    assert (await client.delete("/v1/job-types/no.such.type/limits")).status_code == 404
    for path in ("/v1/queues/-bad/pause", "/v1/queues/a%20b/resume"):
        assert (await client.post(path)).status_code == 422
    assert (await client.put("/v1/queues/-bad/limits", json={})).status_code == 422


def test_rates_parse_and_limits_check_themselves() -> None:
    assert parse_rate("10/s") == (10, 1)
    assert parse_rate(" 600 / m ") == (600, 60)
    assert parse_rate("3/h") == (3, 3600)
    for bad in ("0/s", "1/d", "1.5/s", "/s", "1/", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)
    limits = Limits.declare(rate="20/s")
    assert limits.capacity == 20 and limits.refill_per_second == 20
    assert Limits.declare(rate="60/m", burst=3).capacity == 3
    with pytest.raises(ValueError):
        Limits.declare(burst=3)
    with pytest.raises(ValueError):
        Limits.declare(concurrency=0)
