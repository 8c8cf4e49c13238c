"""What a key learns about others: key ids are not derived from secrets, and tracebacks and
worker host names are shown to admin keys only (with auth off, everything stays visible)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.auth import parse_keys
from app.main import create_app
from app.settings import Settings
from tests.conftest import Backends, make_settings, submit, wait_for_status, wait_until
from tests.security.conftest import Keys, bearer
from tests.support.processes import Spawner


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as c:
            yield c


def derived_from(secret: str) -> list[str]:
    """Hex that anyone holding the secret (or its published digest) could compute."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    again = hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    return [digest[:8], again[:8]]


async def actor_of(client: httpx.AsyncClient, secret: str, queue: str) -> str:
    response = await client.post(
        "/v1/jobs", json={"type": "demo.echo", "queue": queue}, headers=bearer(secret)
    )
    assert response.status_code == 202, response.text
    events = await client.get(f"/v1/jobs/{response.json()['id']}/events", headers=bearer(secret))
    actor: str = events.json()[0]["actor"]
    return actor


async def test_key_ids_are_configured_or_not_derived_from_the_secret(
    backends: Backends, keys: Keys, queue: str
) -> None:
    named = f"producer:team-a:{keys.producer_a},admin:ops:{keys.admin}"
    async with api(make_settings(backends, redis_prefix=f"test-{queue}", api_keys=named)) as client:
        assert await actor_of(client, keys.producer_a, queue) == "team-a"
        assert await actor_of(client, keys.admin, queue) == "ops"

    digest_b = hashlib.sha256(keys.producer_b.encode()).hexdigest()
    unnamed = f"producer:{keys.producer_a},producer:sha256:{digest_b},admin:{keys.admin}"
    async with api(
        make_settings(backends, redis_prefix=f"test-{queue}", api_keys=unnamed)
    ) as client:
        actors = {s: await actor_of(client, s, queue) for s in keys.all()}
    assert len(set(actors.values())) == 3
    for secret, actor in actors.items():
        assert not any(part in actor for part in derived_from(secret)), actor

    # the same key, written plainly or as its digest, after a restart: the same id
    plain = f"producer:{keys.producer_b}"
    async with api(make_settings(backends, redis_prefix=f"test-{queue}", api_keys=plain)) as client:
        assert await actor_of(client, keys.producer_b, queue) == actors[keys.producer_b]


@pytest.mark.parametrize(
    "spec",
    [
        "producer:same:secret-one,admin:same:secret-two",  # an id used twice
        "producer:team:sha256:abcd",  # a digest with an id must still be 64 hex digits
    ],
)
def test_malformed_ids_are_a_startup_error(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_keys(spec)


def test_secrets_without_an_id_part_keep_working() -> None:
    [key] = parse_keys("producer:s3cret")
    assert key.id is None and key.digest == hashlib.sha256(b"s3cret").digest()
    [key] = parse_keys("producer:team-a:s3cret")
    assert key.id == "team-a" and key.digest == hashlib.sha256(b"s3cret").digest()
    [key] = parse_keys("admin:not an id:with colon")
    assert key.id is None and key.digest == hashlib.sha256(b"not an id:with colon").digest()


async def _failed_job(client: httpx.AsyncClient, queue: str, secret: str | None) -> str:
    headers = bearer(secret) if secret else {}
    response = await client.post(
        "/v1/jobs",
        json={"type": "demo.fail", "queue": queue, "max_attempts": 1, "idempotency_key": "k"},
        headers=headers,
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]

    async def dead() -> bool:
        job = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        return bool(job["status"] == "dead")

    await wait_until(dead, timeout=30)
    return job_id


async def _views(
    client: httpx.AsyncClient, job_id: str, queue: str, secret: str | None, *, owner: bool = True
) -> Any:
    """The job's errors as every read shows them (and a repeated submission, for its owner:
    idempotency keys are per API key), its events, and the workers."""
    headers = bearer(secret) if secret else {}
    job = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
    listed = (await client.get("/v1/jobs", params={"queue": queue}, headers=headers)).json()
    dlq = (await client.get("/v1/dlq", params={"queue": queue}, headers=headers)).json()
    bodies = [job, listed["items"][0], dlq["items"][0]]
    if owner:
        repeat = await client.post(
            "/v1/jobs",
            json={"type": "demo.fail", "queue": queue, "max_attempts": 1, "idempotency_key": "k"},
            headers=headers,
        )
        assert repeat.status_code == 200
        bodies.append(repeat.json())
    events = (await client.get(f"/v1/jobs/{job_id}/events", headers=headers)).json()
    workers = (await client.get("/v1/workers", headers=headers)).json()["items"]
    errors = [e for body in bodies for e in body["errors"]]
    return errors, events, workers


async def test_tracebacks_and_worker_hosts_are_for_admins_only(
    secure_settings: Settings, keys: Keys, queue: str, tmp_path: Path
) -> None:
    spawner = Spawner(secure_settings, tmp_path)
    try:
        spawner.worker([queue])
        async with api(secure_settings) as client:
            job_id = await _failed_job(client, queue, keys.producer_a)

            errors, events, workers = await _views(client, job_id, queue, keys.producer_a)
            assert len(errors) == 4
            assert all(e["traceback"] is None and e["worker"] is None for e in errors)
            assert all(e["error"] == "demo failure" for e in errors), "the message stays"
            assert [e["worker"] for e in events] == [None] * len(events)
            assert workers and all(w["host"] is None and w["pid"] is None for w in workers)

            errors, events, workers = await _views(client, job_id, queue, keys.admin, owner=False)
            assert len(errors) == 3
            assert all("DemoFailure" in e["traceback"] and e["worker"] for e in errors)
            assert any(e["worker"] for e in events)
            assert all(w["host"] and w["pid"] for w in workers)
    finally:
        spawner.stop_all()


async def test_without_keys_everything_stays_visible(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    job_id = await _failed_job(client, queue, None)
    errors, events, workers = await _views(client, job_id, queue, None)
    assert all("DemoFailure" in e["traceback"] and e["worker"] for e in errors)
    assert any(e["worker"] for e in events)
    assert all(w["host"] and w["pid"] for w in workers)
    await wait_for_status(client, job_id, {"dead"})
    assert (await submit(client, {"type": "demo.echo", "queue": queue}))["status"] == "queued"
