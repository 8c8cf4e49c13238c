"""Issue 10 item 16: with auth off, a web page the developer visits must not be able to change
anything (a no-cors ``fetch`` sends no JSON content type and no custom header), and DNS
rebinding must not read the API (only configured Host names are answered)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.devserver.supervisor import allowed_hosts
from app.main import create_app
from app.settings import Settings
from tests.conftest import Backends, make_settings
from tests.security.conftest import Database, bearer
from tests.support.processes import Spawner


@pytest.fixture
async def browser(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process, called as a cross-site page would: no X-Requested-With."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as c:
            yield c


async def _queued(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/jobs", json={"type": "demo.echo", "queue": "cross-site"})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 415, response.text
    body = response.json()
    assert body["error"] == "unsupported_media_type"
    assert "X-Requested-With" in body["message"]


async def test_bodiless_cancel_from_a_page_is_415_and_changes_nothing(
    browser: httpx.AsyncClient, db: Database
) -> None:
    job_id = await _queued(browser)
    _refused(await browser.post(f"/v1/jobs/{job_id}/cancel"))
    assert await db.status(job_id) == "queued"
    allowed = await browser.post(
        f"/v1/jobs/{job_id}/cancel", headers={"X-Requested-With": "anything"}
    )
    assert allowed.status_code == 200 and allowed.json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("method", "path", "headers", "content"),
    [
        ("POST", "/v1/dlq/{id}/replay", {}, None),
        ("DELETE", "/v1/dlq/{id}", {}, None),
        # what a no-cors fetch or an HTML form can send: a "simple" content type
        ("POST", "/v1/dlq/replay", {"Content-Type": "text/plain"}, b'{"ids": ["{id}"]}'),
        (
            "POST",
            "/v1/dlq/replay",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"ids={id}",
        ),
    ],
)
async def test_dlq_changes_from_a_page_are_refused(
    browser: httpx.AsyncClient,
    db: Database,
    method: str,
    path: str,
    headers: dict[str, str],
    content: bytes | None,
) -> None:
    job_id = await _queued(browser)
    await db.make_dead(job_id)
    body = content.replace(b"{id}", job_id.encode()) if content else None
    response = await browser.request(method, path.format(id=job_id), headers=headers, content=body)
    _refused(response)
    assert await db.status(job_id) == "dead"
    listed = (await browser.get("/v1/dlq", params={"queue": "cross-site"})).json()["items"]
    assert job_id in [j["id"] for j in listed]


async def test_json_content_type_alone_passes(browser: httpx.AsyncClient) -> None:
    job_id = await _queued(browser)
    response = await browser.post(
        f"/v1/jobs/{job_id}/cancel", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text


async def test_with_auth_on_the_key_header_is_enough(
    secure_client: httpx.AsyncClient, keys: Any
) -> None:
    """A key is a custom header a cross-site page cannot send without a preflight."""
    admin = bearer(keys.admin)
    job = await secure_client.post("/v1/jobs", json={"type": "demo.echo"}, headers=admin)
    cancelled = await secure_client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=admin)
    assert cancelled.status_code == 200, cancelled.text


# -- Host -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/queues", "/metrics", "/docs", "/ui"])
async def test_an_unknown_host_is_400_everywhere_but_the_probes(
    settings: Settings, path: str
) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rebound.example") as c:
            response = await c.get(path)
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "bad_host"
            posted = await c.post("/v1/jobs", json={"type": "demo.echo"})
            assert posted.status_code == 400
            for probe in ("/healthz", "/readyz"):  # orchestrators probe by address
                assert (await c.get(probe)).status_code == 200


@pytest.mark.parametrize(
    ("spec", "host", "allowed"),
    [
        ("localhost,127.0.0.1,[::1]", "localhost:8000", True),
        ("localhost,127.0.0.1,[::1]", "127.0.0.1", True),
        ("localhost,127.0.0.1,[::1]", "[::1]:8000", True),
        ("localhost,127.0.0.1,[::1]", "LOCALHOST", True),
        ("localhost,127.0.0.1,[::1]", "localhost.evil.example", False),
        ("localhost,127.0.0.1,[::1]", "evil.example:8000", False),
        ("localhost,127.0.0.1,[::1]", "", False),
        ("api,.example.com", "jobs.example.com:443", True),
        ("api,.example.com", "example.com", True),
        ("api,.example.com", "badexample.com", False),
        ("*", "anything.at.all", True),
    ],
)
async def test_allowed_hosts_setting(
    backends: Backends, spec: str, host: str, allowed: bool
) -> None:
    app = create_app(make_settings(backends, allowed_hosts=spec))
    transport = httpx.ASGITransport(app=app)  # no lifespan: the gate answers before any route
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
        response = await c.get("/v1/nowhere", headers={"Host": host})
    assert response.status_code == (404 if allowed else 400), (host, response.text)


def test_a_real_api_refuses_a_rebound_host_and_keeps_serving_its_own(spawn: Spawner) -> None:
    _, url = spawn.api()
    rebound = httpx.get(f"{url}/v1/jobs", headers={"Host": "attacker.example"}, timeout=10)
    assert rebound.status_code == 400 and rebound.json()["error"] == "bad_host"
    own = httpx.get(f"{url}/v1/jobs", timeout=10)  # Host: 127.0.0.1:<port>
    assert own.status_code == 200


def test_the_default_answers_local_names_only() -> None:
    assert Settings(_env_file=None).allowed_hosts == "localhost,127.0.0.1,[::1]"


@pytest.mark.parametrize(
    ("host", "added"),
    [("127.0.0.1", "127.0.0.1"), ("192.168.7.7", "192.168.7.7"), ("::1", "[::1]")],
)
def test_conveyor_dev_allows_the_address_it_binds(host: str, added: str) -> None:
    spec = allowed_hosts(host, Settings(_env_file=None))
    assert spec.split(",")[-1] == added and spec.startswith("localhost,")


def test_conveyor_dev_keeps_a_configured_list() -> None:
    configured = Settings(_env_file=None, allowed_hosts="jobs.internal")
    assert allowed_hosts("0.0.0.0", configured) == "jobs.internal"
