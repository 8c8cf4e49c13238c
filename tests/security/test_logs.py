"""No secrets in logs: real API and worker processes, the auth matrix and bad payloads carrying
a planted canary secret; then every line they wrote is scanned for the keys and the canary.

The processes run at DEBUG so that every logger that could leak gets its chance to.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.db.engine import create_engine
from app.settings import Settings
from tests.conftest import Backends, make_settings
from tests.security.conftest import Keys, api_key, bearer
from tests.security.test_auth import ENDPOINTS, World, _fill
from tests.support.processes import Spawner

CANARY = f"canary-{secrets.token_hex(12)}"
WRONG_KEY = f"wrong-{secrets.token_hex(12)}"


JSON = "application/json"
DEEP = "[" * 64 + "0" + "]" * 64
# (path, body with CANARY standing for the canary, content type): each one is rejected
BAD_BODIES = [
    ("/v1/jobs", '{"type": "demo.sleep", "payload": {"seconds": "CANARY"}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "max_attempts": "CANARY"}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {}, "surprise": "CANARY"}', JSON),
    ("/v1/jobs", '{"type": "no.such.type", "payload": {"password": "CANARY"}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"password": "CANARY"}', JSON),
    ("/v1/jobs", '[{"type": "demo.echo", "payload": {"password": "CANARY"}}]', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"a": "CANARY\\u0000"}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"a": "CANARY\\ud800"}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"a": "CANARY", "n": 1e400}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"a": "CANARY", "a": 1}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"d": ' + DEEP + ', "a": "CANARY"}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"big": "' + "CANARY" * 20000 + '"}}', JSON),
    ("/v1/jobs", '{"type": "demo.echo", "payload": {"password": "CANARY"}}', "text/plain"),
    (
        "/v1/jobs/batch",
        '{"jobs": [{"type": "demo.echo", "payload": {"password": "CANARY"}},'
        ' {"type": "demo.sleep", "payload": {"seconds": "CANARY"}}]}',
        JSON,
    ),
    ("/v1/dlq/replay", '{"ids": ["CANARY"]}', JSON),
    # the same idempotency key with another request: 409
    ("/v1/jobs", '{"type": "demo.echo", "idempotency_key": "k1", "payload": {"a": "1"}}', JSON),
    (
        "/v1/jobs",
        '{"type": "demo.echo", "idempotency_key": "k1", "payload": {"a": "CANARY"}}',
        JSON,
    ),
]


def _wait_terminal(client: httpx.Client, job_id: str, headers: dict[str, str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = str(client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"])
        if status in ("succeeded", "dead", "cancelled"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def _drive(client: httpx.Client, keys: Keys, queue: str) -> list[httpx.Response]:
    """The auth matrix and the bad payloads; returns every response."""
    admin, producer = bearer(keys.admin), api_key(keys.producer_a)
    responses = []
    own = client.post(
        "/v1/jobs",
        json={"type": "demo.echo", "queue": queue, "payload": {"k": CANARY}, "delay_seconds": 3600},
        headers=producer,
    ).json()["id"]
    dead = client.post(
        "/v1/jobs",
        json={
            "type": "demo.fail",
            "queue": queue,
            "max_attempts": 1,
            "payload": {"message": CANARY},
        },
        headers=producer,
    ).json()["id"]
    echo = client.post(
        "/v1/jobs",
        json={"type": "demo.echo", "queue": queue, "payload": {"k": CANARY}},
        headers=producer,
    ).json()["id"]
    assert _wait_terminal(client, dead, admin) == "dead"
    assert _wait_terminal(client, echo, admin) == "succeeded"
    world = World(queue, own, dead, other=echo)
    credentials = [
        {},
        bearer(WRONG_KEY),
        api_key(WRONG_KEY),
        producer,
        api_key(keys.producer_b),
        admin,
    ]
    for ep in ENDPOINTS:
        for headers in credentials:
            responses.append(
                client.request(
                    ep.method, _fill(ep.path, world), json=_fill(ep.body, world), headers=headers
                )
            )
    for path, body, content_type in BAD_BODIES:
        content = body.replace("CANARY", CANARY).encode()
        for headers in (producer, bearer(WRONG_KEY)):
            sent = {"Content-Type": content_type, **headers}
            responses.append(client.post(path, content=content, headers=sent))
    return responses


@pytest.fixture
def debug_settings(backends: Backends, keys: Keys) -> Settings:
    return make_settings(
        backends, api_keys=keys.spec, log_level="DEBUG", handler_modules="workers.handlers"
    )


def test_no_key_or_canary_in_any_log_or_error(
    spawn: Spawner, keys: Keys, queue: str, debug_settings: Settings
) -> None:
    api, url = spawn.api(settings=debug_settings)
    worker = spawn.worker([queue], settings=debug_settings)
    with httpx.Client(base_url=url, timeout=30) as client:
        responses = _drive(client, keys, queue)
    errors = [r for r in responses if r.status_code >= 400]
    assert all(r.status_code < 500 for r in responses), [
        r.text for r in responses if r.status_code >= 500
    ]
    assert {401, 403, 404, 409, 413, 415, 422} <= {r.status_code for r in errors}
    for response in errors:
        assert CANARY not in response.text, response.text
        assert WRONG_KEY not in response.text
    api.stop()
    worker.stop()
    secrets_ = [*keys.all(), WRONG_KEY, CANARY]
    for proc in (api, worker):
        output = proc.output()
        assert len(output.splitlines()) >= 5, output  # the scan read real logs
        hits = [line for line in output.splitlines() if any(s in line for s in secrets_)]
        assert hits == [], f"{proc.name} logged a secret:\n" + "\n".join(hits[:20])
    lines = [len(p.output().splitlines()) for p in (api, worker)]
    print(f"scanned {lines[0]} API and {lines[1]} worker log lines; {len(responses)} requests")


def test_api_warns_at_startup_when_no_keys_are_set(
    spawn: Spawner, keys: Keys, backends: Backends
) -> None:
    open_api, _ = spawn.api()
    prefix = spawn.settings.redis_prefix  # one deployment: the stream layout must agree
    secured, _ = spawn.api(
        settings=make_settings(backends, api_keys=keys.spec, redis_prefix=prefix)
    )
    open_api.stop()
    secured.stop()
    assert "CONVEYOR_API_KEYS is not set" in open_api.output()
    assert "CONVEYOR_API_KEYS is not set" not in secured.output()


async def test_database_errors_do_not_carry_statement_parameters(settings: Settings) -> None:
    """A database error's text (which the worker's retry loops log) must not carry payloads."""
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            with pytest.raises(DBAPIError) as failure:
                await conn.execute(text("SELECT 1 / 0 WHERE :p <> ''"), {"p": CANARY})
    finally:
        await engine.dispose()
    assert "division by zero" in str(failure.value)
    assert CANARY not in str(failure.value)
