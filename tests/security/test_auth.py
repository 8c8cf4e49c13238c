"""The auth matrix: every endpoint x {no key, wrong key, producer, admin}, with row snapshots.

Keys: producer A (plain secret), producer B (configured only as ``producer:sha256:<hex>``) and
an admin. A rejected request must change nothing: the count of ``jobs`` and ``job_events`` rows
and a digest of every job's state are compared before and after, by SQL.
"""

from __future__ import annotations

import ast
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api import auth as auth_module
from app.api.auth import parse_keys
from tests.security.conftest import Database, Keys, api_key, bearer


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str  # {own}: producer A's queued job; {dead}: A's dead job; {queue}: the test queue
    body: Any = None
    admin_only: bool = False
    producer_status: int = 200
    admin_status: int = 200


ENDPOINTS = [
    Endpoint(
        "submit", "POST", "/v1/jobs", {"type": "demo.echo", "queue": "{queue}"}, False, 202, 202
    ),
    Endpoint(
        "batch",
        "POST",
        "/v1/jobs/batch",
        {"jobs": [{"type": "demo.echo", "queue": "{queue}"}]},
        False,
        202,
        202,
    ),
    Endpoint("list", "GET", "/v1/jobs?queue={queue}"),
    Endpoint("get", "GET", "/v1/jobs/{own}"),
    Endpoint("events", "GET", "/v1/jobs/{own}/events"),
    Endpoint("cancel", "POST", "/v1/jobs/{own}/cancel"),
    Endpoint("dlq", "GET", "/v1/dlq?queue={queue}"),
    Endpoint("replay", "POST", "/v1/dlq/{dead}/replay", None, True, 403, 202),
    Endpoint("replay_many", "POST", "/v1/dlq/replay", {"ids": ["{dead}"]}, True, 403, 202),
    Endpoint("dlq_delete", "DELETE", "/v1/dlq/{dead}", None, True, 403, 204),
    Endpoint("queues", "GET", "/v1/queues"),
    Endpoint("workers", "GET", "/v1/workers"),
    Endpoint("job_types", "GET", "/v1/job-types"),
    Endpoint("pause", "POST", "/v1/queues/{queue}/pause", None, True, 403, 200),
    Endpoint("resume", "POST", "/v1/queues/{queue}/resume", None, True, 403, 200),
    Endpoint(
        "queue_limits", "PUT", "/v1/queues/{queue}/limits", {"concurrency": 50}, True, 403, 200
    ),
    Endpoint("queue_limits_rm", "DELETE", "/v1/queues/{queue}/limits", None, True, 403, 200),
    Endpoint("type_limits", "PUT", "/v1/job-types/demo.echo/limits", {}, True, 403, 200),
    Endpoint("type_limits_rm", "DELETE", "/v1/job-types/demo.echo/limits", None, True, 403, 200),
]
OPEN_PATHS = ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/ui"]


@dataclass
class World:
    queue: str
    own: str  # producer A's queued job
    dead: str  # producer A's dead job
    other: str  # producer B's queued job


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str):
        return value.format(queue=world.queue, own=world.own, dead=world.dead)
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


async def call(
    client: httpx.AsyncClient, ep: Endpoint, world: World, headers: dict[str, str]
) -> httpx.Response:
    body = _fill(ep.body, world)
    return await client.request(
        ep.method, _fill(ep.path, world), json=body, headers=headers if headers else None
    )


async def _submit(client: httpx.AsyncClient, secret: str, queue: str) -> str:
    response = await client.post(
        "/v1/jobs", json={"type": "demo.echo", "queue": queue}, headers=bearer(secret)
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.fixture
async def world(secure_client: httpx.AsyncClient, keys: Keys, queue: str, db: Database) -> World:
    own = await _submit(secure_client, keys.producer_a, queue)
    dead = await _submit(secure_client, keys.producer_a, queue)
    await db.make_dead(dead)
    other = await _submit(secure_client, keys.producer_b, queue)
    return World(queue, own, dead, other)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code


NO_KEY: dict[str, str] = {}
BAD_CREDENTIALS = {
    "no_key": NO_KEY,
    "wrong_bearer": bearer("not-a-key"),
    "wrong_x_api_key": api_key("not-a-key"),
    "basic_scheme": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    "empty_bearer": {"Authorization": "Bearer "},
}


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: e.name)
@pytest.mark.parametrize("cred", list(BAD_CREDENTIALS), ids=str)
async def test_missing_or_wrong_key_is_401_and_writes_nothing(
    secure_client: httpx.AsyncClient, world: World, db: Database, ep: Endpoint, cred: str
) -> None:
    before = await db.snapshot()
    response = await call(secure_client, ep, world, BAD_CREDENTIALS[cred])
    assert_error(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert await db.snapshot() == before


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: e.name)
async def test_producer_matrix(
    secure_client: httpx.AsyncClient, world: World, db: Database, keys: Keys, ep: Endpoint
) -> None:
    before = await db.snapshot()
    response = await call(secure_client, ep, world, api_key(keys.producer_a))
    assert response.status_code == ep.producer_status, response.text
    if ep.admin_only:
        assert_error(response, 403, "forbidden")
        assert await db.snapshot() == before
        assert await db.status(world.dead) == "dead"


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: e.name)
async def test_admin_matrix(
    secure_client: httpx.AsyncClient, world: World, keys: Keys, ep: Endpoint
) -> None:
    response = await call(secure_client, ep, world, bearer(keys.admin))
    assert response.status_code == ep.admin_status, response.text


async def test_admin_operations_take_effect(
    secure_client: httpx.AsyncClient, world: World, db: Database, keys: Keys
) -> None:
    admin = bearer(keys.admin)
    replayed = await secure_client.post(f"/v1/dlq/{world.dead}/replay", headers=admin)
    assert replayed.status_code == 202 and replayed.json()["status"] == "queued"
    cancelled = await secure_client.post(f"/v1/jobs/{world.other}/cancel", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert await db.status(world.other) == "cancelled"


@pytest.mark.parametrize("op", ["get", "events", "cancel"])
async def test_other_producers_job_is_404_like_an_unknown_id(
    secure_client: httpx.AsyncClient, world: World, db: Database, keys: Keys, op: str
) -> None:
    """No existence oracle: another key's job answers exactly as a job that does not exist."""
    paths = {"get": "/v1/jobs/{}", "events": "/v1/jobs/{}/events", "cancel": "/v1/jobs/{}/cancel"}
    method = "POST" if op == "cancel" else "GET"
    before = await db.snapshot()
    theirs = await secure_client.request(
        method, paths[op].format(world.other), headers=bearer(keys.producer_a)
    )
    unknown = await secure_client.request(
        method, paths[op].format(uuid.uuid4()), headers=bearer(keys.producer_a)
    )
    assert_error(theirs, 404, "not_found")
    assert theirs.json() == unknown.json()
    assert await db.snapshot() == before
    assert await db.status(world.other) == "queued"


async def test_producer_reads_and_cancels_its_own_job(
    secure_client: httpx.AsyncClient, world: World, keys: Keys
) -> None:
    mine = api_key(keys.producer_a)
    got = await secure_client.get(f"/v1/jobs/{world.own}", headers=mine)
    assert got.status_code == 200 and got.json()["id"] == world.own
    events = await secure_client.get(f"/v1/jobs/{world.own}/events", headers=mine)
    assert events.status_code == 200 and events.json()[0]["event"] == "submitted"
    cancelled = await secure_client.post(f"/v1/jobs/{world.own}/cancel", headers=mine)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


async def test_listings_show_a_producer_only_its_own_jobs(
    secure_client: httpx.AsyncClient, world: World, keys: Keys
) -> None:
    async def ids(path: str, secret: str) -> set[str]:
        response = await secure_client.get(path, headers=bearer(secret))
        assert response.status_code == 200
        return {item["id"] for item in response.json()["items"]}

    jobs = f"/v1/jobs?queue={world.queue}"
    assert await ids(jobs, keys.producer_a) == {world.own, world.dead}
    assert await ids(jobs, keys.producer_b) == {world.other}
    assert await ids(jobs, keys.admin) == {world.own, world.dead, world.other}
    dlq = f"/v1/dlq?queue={world.queue}"
    assert await ids(dlq, keys.producer_a) == {world.dead}
    assert await ids(dlq, keys.producer_b) == set()
    assert await ids(dlq, keys.admin) == {world.dead}


@pytest.mark.parametrize("path", OPEN_PATHS)
async def test_health_readiness_metrics_docs_and_ui_need_no_key(
    secure_client: httpx.AsyncClient, path: str
) -> None:
    response = await secure_client.get(path)
    assert response.status_code == 200, response.text


async def test_unknown_v1_path_without_key_is_401_not_404(
    secure_client: httpx.AsyncClient,
) -> None:
    """Unauthenticated callers cannot map the API either."""
    assert_error(await secure_client.get("/v1/no-such-thing"), 401, "unauthenticated")


# --- order of checks: authentication first, then the body, then the role, then the schema ---


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"type": "demo.echo",', "application/json"),  # malformed
        (b'{"type": 1}', "application/json"),  # fails the schema
        (b"type=demo.echo", "text/plain"),  # wrong media type
        (b"[" * 100_000, "application/json"),  # too deep
        (b"x" * 2_000_000, "application/json"),  # too large
    ],
    ids=["malformed", "schema", "media_type", "deep", "large"],
)
@pytest.mark.parametrize("cred", ["no_key", "wrong_bearer"])
async def test_bad_key_with_bad_body_is_401_not_4xx(
    secure_client: httpx.AsyncClient, db: Database, content: bytes, content_type: str, cred: str
) -> None:
    before = await db.counts()
    response = await secure_client.post(
        "/v1/jobs",
        content=content,
        headers={"Content-Type": content_type, **BAD_CREDENTIALS[cred]},
    )
    assert_error(response, 401, "unauthenticated")
    assert await db.counts() == before


@pytest.mark.parametrize(
    "body", [{"nonsense": 1}, {"ids": "not-a-list"}, {}], ids=["extra", "type", "empty"]
)
async def test_producer_with_bad_body_on_admin_route_is_403(
    secure_client: httpx.AsyncClient, db: Database, keys: Keys, body: dict[str, Any]
) -> None:
    before = await db.snapshot()
    response = await secure_client.post(
        "/v1/dlq/replay", json=body, headers=bearer(keys.producer_a)
    )
    assert_error(response, 403, "forbidden")
    assert await db.snapshot() == before


async def test_producer_on_admin_route_with_malformed_id_is_403(
    secure_client: httpx.AsyncClient, keys: Keys
) -> None:
    response = await secure_client.delete("/v1/dlq/not-a-uuid", headers=bearer(keys.producer_a))
    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/jobs", {"type": "demo.sleep", "payload": {"seconds": "forever"}}),
        ("/v1/jobs", {"type": "no.such.type"}),
        ("/v1/jobs", {"type": "demo.echo", "surprise": True}),
        ("/v1/jobs", {"type": "demo.echo", "max_attempts": 0}),
        ("/v1/jobs/batch", {"jobs": [{"type": "demo.echo"}, {"type": "demo.sleep"}]}),
        ("/v1/jobs/batch", {"jobs": []}),
        ("/v1/dlq/replay", {}),
    ],
)
async def test_validation_failures_write_nothing(
    secure_client: httpx.AsyncClient, db: Database, keys: Keys, path: str, body: dict[str, Any]
) -> None:
    before = await db.snapshot()
    response = await secure_client.post(path, json=body, headers=bearer(keys.admin))
    assert_error(response, 422, "invalid")
    assert await db.snapshot() == before


# --- the key setting itself ---


async def test_both_header_styles_and_the_sha256_form_authenticate(
    secure_client: httpx.AsyncClient, keys: Keys
) -> None:
    for headers in (bearer(keys.producer_b), api_key(keys.producer_b), bearer(keys.admin)):
        assert (await secure_client.get("/v1/job-types", headers=headers)).status_code == 200
    # the digest itself is not a key
    digest = keys.spec.split("sha256:")[1].split(",")[0]
    assert (await secure_client.get("/v1/job-types", headers=bearer(digest))).status_code == 401


@pytest.mark.parametrize(
    "spec", ["root:secret", "producer:", "admin:sha256:abcd", "producer:sha256:" + "zz" * 32]
)
def test_malformed_key_setting_is_a_startup_error(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_keys(spec)


def test_secrets_are_compared_only_with_compare_digest() -> None:
    """Static check: digests are compared with hmac.compare_digest, never with == or !=."""
    source = Path(auth_module.__file__).read_text()
    tree = ast.parse(source)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "hmac.compare_digest"
    ]
    assert len(calls) == 1
    equalities = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops)
        and not any(isinstance(side, ast.Constant) for side in [node.left, *node.comparators])
        and any(word in ast.unparse(node) for word in ("digest", "secret", "key"))
    ]
    assert equalities == []
