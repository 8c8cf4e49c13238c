"""/v1/schedules over HTTP: create, read, list, change, pause/resume, delete, trigger; auth."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.conftest import Backends, make_settings

ADMIN = "schedules-admin-secret"
PRODUCER = "schedules-producer-secret"


def name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def body(**fields: Any) -> dict[str, Any]:
    return {"name": name(), "cron": "*/5 * * * *", "type": "demo.echo", **fields}


async def create(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/schedules", json=body(**fields))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_create_then_read_and_list(client: httpx.AsyncClient, queue: str) -> None:
    before = datetime.now(UTC)
    response = await client.post(
        "/v1/schedules",
        json=body(payload={"n": 1}, queue=queue, priority=5, timezone="Asia/Kolkata"),
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["Location"] == f"/v1/schedules/{created['name']}"
    assert created["cron"] == "*/5 * * * *"
    assert created["timezone"] == "Asia/Kolkata"
    assert (created["queue"], created["priority"], created["payload"]) == (queue, 5, {"n": 1})
    assert created["enabled"] is True
    assert created["missed"] == "skip"
    assert created["source"] == "api"
    assert created["last_run_at"] is None
    first = at(created["next_run_at"])
    assert before - timedelta(seconds=5) < first <= before + timedelta(minutes=5, seconds=5)
    assert first.minute % 5 == 0 and first.second == 0  # Kolkata is +05:30: still on the 5s

    got = await client.get(f"/v1/schedules/{created['name']}")
    assert got.status_code == 200
    assert got.json() == created


async def test_list_pages_by_name(client: httpx.AsyncClient) -> None:
    prefix = f"page-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        await create(client, name=f"{prefix}-{i}")
    names: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/schedules", params=params)).json()
        names += [s["name"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == sorted(names)
    assert [n for n in names if n.startswith(prefix)] == [f"{prefix}-{i}" for i in range(3)]


async def test_every_interval_slots_are_aligned(client: httpx.AsyncClient) -> None:
    created = await create(client, cron="@every 30s")
    first = at(created["next_run_at"])
    assert first.second in (0, 30) and first.microsecond == 0
    assert (await create(client, cron="@hourly"))["cron"] == "@hourly"


async def test_name_taken_is_409(client: httpx.AsyncClient) -> None:
    created = await create(client)
    again = await client.post("/v1/schedules", json=body(name=created["name"], cron="@every 1m"))
    assert again.status_code == 409
    assert again.json()["error"] == "conflict"
    # the first one is unchanged
    assert (await client.get(f"/v1/schedules/{created['name']}")).json() == created


@pytest.mark.parametrize(
    "fields",
    [
        {"cron": "bogus"},
        {"cron": "* * * * * *"},  # 6 fields: seconds are written as @every
        {"cron": "61 * * * *"},
        {"cron": "0 0 31 2 *"},  # never happens
        {"cron": "@every 0s"},
        {"cron": "@every 5d"},
        {"cron": "@every 367h0s"},
        {"cron": "@every 9000h"},
        {"cron": ""},
        {"timezone": "Mars/Olympus_Mons"},
        {"timezone": "../../etc/passwd"},
        {"timezone": ""},
        {"type": "no.such.type"},
        {"type": "demo.sleep", "payload": {"seconds": -1}},
        {"missed": "always"},
        {"priority": "high"},
        {"enabled": "yes"},
        {"queue": "bad queue"},
        {"name": "has space"},
        {"name": ""},
        {"surprise": 1},
    ],
)
async def test_bad_input_is_422(client: httpx.AsyncClient, fields: dict[str, Any]) -> None:
    sent = body(**fields)
    response = await client.post("/v1/schedules", json=sent)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"] == "invalid" and error["message"]
    if sent["name"]:  # nothing was written
        assert (await client.get(f"/v1/schedules/{sent['name']}")).status_code in (404, 422)


async def test_patch_changes_fields_and_retimes(client: httpx.AsyncClient) -> None:
    created = await create(client, cron="0 0 1 1 *")  # once a year
    response = await client.patch(
        f"/v1/schedules/{created['name']}",
        json={"cron": "@every 10s", "payload": {"x": 2}, "missed": "run_once"},
    )
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["cron"], changed["payload"], changed["missed"]) == (
        "@every 10s",
        {"x": 2},
        "run_once",
    )
    assert at(changed["next_run_at"]) < datetime.now(UTC) + timedelta(seconds=15)
    assert at(changed["updated_at"]) >= at(created["updated_at"])

    # a priority change leaves the slots where they are
    again = (await client.patch(f"/v1/schedules/{created['name']}", json={"priority": 3})).json()
    assert again["next_run_at"] == changed["next_run_at"]


@pytest.mark.parametrize(
    "fields",
    [
        {"cron": "nope"},
        {"timezone": "Nowhere/City"},
        {"type": "demo.sleep"},  # the payload {} does not fit demo.sleep
        {"payload": None},
        {"cron": None},
        {"name": "renamed"},
        {"priority": 5000},
    ],
)
async def test_bad_patch_is_422_and_changes_nothing(
    client: httpx.AsyncClient, fields: dict[str, Any]
) -> None:
    created = await create(client)
    response = await client.patch(f"/v1/schedules/{created['name']}", json=fields)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    assert (await client.get(f"/v1/schedules/{created['name']}")).json() == created


async def test_pause_and_resume(client: httpx.AsyncClient) -> None:
    created = await create(client, cron="@every 1m")
    paused = await client.post(f"/v1/schedules/{created['name']}/pause")
    assert paused.status_code == 200
    assert paused.json()["enabled"] is False
    assert paused.json()["next_run_at"] is None
    resumed = await client.post(f"/v1/schedules/{created['name']}/resume")
    assert resumed.status_code == 200
    assert resumed.json()["enabled"] is True
    assert at(resumed.json()["next_run_at"]) > datetime.now(UTC) - timedelta(seconds=1)


async def test_delete(client: httpx.AsyncClient) -> None:
    created = await create(client)
    path = f"/v1/schedules/{created['name']}"
    deleted = await client.delete(path)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await client.get(path)).status_code == 404
    assert (await client.delete(path)).status_code == 404


async def test_unknown_schedule_is_404(client: httpx.AsyncClient) -> None:
    missing = f"/v1/schedules/{name()}"
    for method, path in [
        ("GET", missing),
        ("PATCH", missing),
        ("DELETE", missing),
        ("POST", f"{missing}/pause"),
        ("POST", f"{missing}/resume"),
        ("POST", f"{missing}/trigger"),
    ]:
        response = await client.request(method, path, json={} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"] == "not_found"


async def test_trigger_makes_a_job_now(client: httpx.AsyncClient, queue: str) -> None:
    created = await create(client, queue=queue, payload={"hello": "now"}, enabled=False)
    response = await client.post(f"/v1/schedules/{created['name']}/trigger")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert (job["type"], job["queue"], job["payload"]) == ("demo.echo", queue, {"hello": "now"})
    assert job["schedule"] == created["name"]
    assert job["scheduled_for"] is None
    read = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert (read["schedule"], read["scheduled_for"]) == (created["name"], None)
    after = (await client.get(f"/v1/schedules/{created['name']}")).json()
    assert after["last_run_at"] is not None
    assert after["enabled"] is False  # a trigger does not resume it
    # a second trigger is a second job
    second = (await client.post(f"/v1/schedules/{created['name']}/trigger")).json()
    assert second["id"] != job["id"]


@pytest.fixture
async def secured(backends: Backends) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(backends, api_keys=f"admin:{ADMIN},producer:{PRODUCER}")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as c:
            yield c


async def test_admin_only_reading_too(secured: httpx.AsyncClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    producer = {"Authorization": f"Bearer {PRODUCER}"}
    response = await secured.post("/v1/schedules", json=body(), headers=admin)
    assert response.status_code == 201
    path = f"/v1/schedules/{response.json()['name']}"
    calls = [
        ("GET", "/v1/schedules", None),
        ("POST", "/v1/schedules", body()),
        ("GET", path, None),
        ("PATCH", path, {"priority": 1}),
        ("DELETE", path, None),
        ("POST", f"{path}/pause", None),
        ("POST", f"{path}/resume", None),
        ("POST", f"{path}/trigger", None),
    ]
    for method, url, payload in calls:
        as_producer = await secured.request(method, url, json=payload, headers=producer)
        assert as_producer.status_code == 403, (method, url)
        assert as_producer.json()["error"] == "forbidden"
        anonymous = await secured.request(method, url, json=payload)
        assert anonymous.status_code == 401, (method, url)
    assert (await secured.get(path, headers=admin)).status_code == 200  # nothing changed it
    assert (await secured.get("/v1/schedules", headers=admin)).status_code == 200
