"""Per-key rate limiting with the Redis token bucket: 429 + Retry-After, per key, fail-open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.devserver import EmbeddedRedis
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings
from tests.security.conftest import Database, Keys, bearer


@asynccontextmanager
async def serve(
    settings: Settings, client: tuple[str, int] = ("127.0.0.1", 123)
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            yield c


def limited(backends: Backends, keys: Keys, rate: float, burst: int, **extra: Any) -> Settings:
    return make_settings(
        backends,
        api_keys=keys.spec,
        rate_limit_per_second=rate,
        rate_limit_burst=burst,
        **extra,
    )


def assert_429(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"error", "message", "details"} and body["error"] == "rate_limited"
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


async def test_off_by_default(client: httpx.AsyncClient, settings: Settings) -> None:
    assert settings.rate_limit_per_second == 0
    statuses = {(await client.get("/v1/job-types")).status_code for _ in range(60)}
    assert statuses == {200}


async def test_over_the_limit_is_429_with_retry_after_and_other_keys_are_unaffected(
    backends: Backends, keys: Keys, db: Database, queue: str
) -> None:
    async with serve(limited(backends, keys, rate=0.5, burst=4)) as c:
        a, b = bearer(keys.producer_a), bearer(keys.producer_b)
        job = {"type": "demo.echo", "queue": queue}
        before_jobs, _ = await db.counts()
        responses = [await c.post("/v1/jobs", json=job, headers=a) for _ in range(12)]
        accepted = [r for r in responses if r.status_code == 202]
        rejected = [r for r in responses if r.status_code != 202]
        assert 4 <= len(accepted) <= 5  # the burst, plus at most one refill at 0.5/s
        for r in rejected:
            assert_429(r)
        # a rejected submission wrote nothing
        assert (await db.counts())[0] == before_jobs + len(accepted)
        # producer B and the admin have buckets of their own
        assert (await c.post("/v1/jobs", json=job, headers=b)).status_code == 202
        assert (await c.get("/v1/queues", headers=bearer(keys.admin))).status_code == 200
        # every /v1 route is limited for A, reads included
        assert_429(await c.get("/v1/job-types", headers=a))


@pytest.mark.serial  # the second request must come within the second of the first
async def test_waiting_retry_after_lets_the_key_in_again(backends: Backends, keys: Keys) -> None:
    async with serve(limited(backends, keys, rate=1.0, burst=1)) as c:
        a = bearer(keys.producer_a)
        assert (await c.get("/v1/job-types", headers=a)).status_code == 200
        retry_after = assert_429(await c.get("/v1/job-types", headers=a))
        assert retry_after <= 2
        await asyncio.sleep(retry_after)
        assert (await c.get("/v1/job-types", headers=a)).status_code == 200


async def test_open_endpoints_are_never_limited(backends: Backends, keys: Keys) -> None:
    async with serve(limited(backends, keys, rate=0.1, burst=1)) as c:
        a = bearer(keys.producer_a)
        await c.get("/v1/job-types", headers=a)
        assert_429(await c.get("/v1/job-types", headers=a))
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/ui"]:
            for _ in range(3):
                assert (await c.get(path, headers=a)).status_code == 200, path


async def test_unauthenticated_requests_are_401_not_429(backends: Backends, keys: Keys) -> None:
    async with serve(limited(backends, keys, rate=0.1, burst=1)) as c:
        statuses = [(await c.get("/v1/job-types")).status_code for _ in range(5)]
        assert statuses == [401] * 5


async def test_without_auth_the_bucket_is_per_client_address(backends: Backends) -> None:
    app = create_app(make_settings(backends, rate_limit_per_second=0.1, rate_limit_burst=2))

    def client_from(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 5000))
        return httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        )

    async with app.router.lifespan_context(app), client_from("10.0.0.1") as first:
        statuses = [(await first.get("/v1/job-types")).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        async with client_from("10.0.0.2") as second:
            assert (await second.get("/v1/job-types")).status_code == 200


async def test_sustained_overload_is_bounded_and_a_polite_key_sees_no_429(
    backends: Backends, keys: Keys
) -> None:
    """S4 in small: A sends about 3x its rate for 3 s while B stays under its own rate."""
    rate, burst, seconds = 4.0, 4, 3.0
    async with serve(limited(backends, keys, rate=rate, burst=burst)) as c:
        a, b = bearer(keys.producer_a), bearer(keys.producer_b)

        async def greedy() -> list[int]:
            statuses = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                statuses.append((await c.get("/v1/job-types", headers=a)).status_code)
                await asyncio.sleep(1 / (3 * rate))
            return statuses

        async def polite() -> list[int]:
            statuses = []
            for _ in range(int(seconds)):
                statuses.append((await c.get("/v1/job-types", headers=b)).status_code)
                await asyncio.sleep(1.0)
            return statuses

        started = time.monotonic()
        greedy_statuses, polite_statuses = await asyncio.gather(greedy(), polite())
        elapsed = time.monotonic() - started
        accepted = greedy_statuses.count(200)
        print(
            f"greedy: {len(greedy_statuses)} requests in {elapsed:.1f}s, {accepted} accepted"
            f" (bound {rate * elapsed + burst:.1f})"
        )
        assert set(greedy_statuses) <= {200, 429}
        assert burst <= accepted <= rate * elapsed + burst + 1
        assert polite_statuses == [200] * int(seconds)


async def test_redis_down_fails_open_with_a_warning(
    backends: Backends, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The limiter holds no job truth: without Redis it lets requests through and says so."""
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = redis.start()
    try:
        settings = limited(backends, keys, rate=0.1, burst=2, redis_url=url)
        async with serve(settings) as c:
            a = bearer(keys.producer_a)
            statuses = [(await c.get("/v1/job-types", headers=a)).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]
            redis.kill()
            with caplog.at_level(logging.WARNING, logger="app.api.ratelimit"):
                statuses = [(await c.get("/v1/job-types", headers=a)).status_code for _ in range(5)]
            assert statuses == [200] * 5
            warnings = [r for r in caplog.records if r.name == "app.api.ratelimit"]
            assert len(warnings) == 1 and "not limiting" in warnings[0].getMessage()
            redis.start()  # same port, empty: limiting resumes after the fail-open window

            async def limiting_again() -> bool:
                response = await c.get("/v1/job-types", headers=a)
                assert response.status_code in (200, 429)
                return response.status_code == 429

            deadline = time.monotonic() + 30
            while not await limiting_again():
                assert time.monotonic() < deadline, "the limiter never came back"
                await asyncio.sleep(0.2)
    finally:
        redis.stop()
