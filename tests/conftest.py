"""Test fixtures: real PostgreSQL and Redis, a fresh database per run, a prefix per test.

With ``CONVEYOR_TEST_DATABASE_URL`` and ``CONVEYOR_TEST_REDIS_URL`` set, those servers are used
(a throwaway database is created on the Postgres server and dropped at the end; the Redis
server is never flushed: every test has its own key prefix). Otherwise the tests start their
own servers from the embedded wheels, so a fresh machine needs nothing but Python.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.db.migrate import upgrade
from app.devserver import EmbeddedPostgres, EmbeddedRedis
from app.main import create_app
from app.settings import Settings
from tests.support import alone, db
from tests.support.db import scratch_database
from tests.support.processes import Spawner

# What Conveyor's own clients send: with auth off, a bodiless POST or DELETE needs it (or a
# JSON content type) to pass the gate's cross-site check.
CLIENT_HEADERS = {"X-Requested-With": "conveyor-tests"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{alone.MARK}: runs alone while the suite runs in parallel (asserts a timing, or "
        "measures a load); see tests/support/alone.py",
    )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Around the whole test (before pytest-timeout starts its clock): the run's test lock."""
    directory = alone.lock_directory(item.config)
    if directory is None:
        yield
        return
    with alone.turn(directory, alone=item.get_closest_marker(alone.MARK) is not None):
        yield


@dataclass(frozen=True)
class Backends:
    database_url: str
    redis_url: str


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    servers: list[EmbeddedPostgres | EmbeddedRedis] = []
    server_url = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if not server_url:
        pg = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"))
        server_url = pg.start()
        servers.append(pg)
    if not redis_url:
        redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False)
        redis_url = redis.start()
        servers.append(redis)
    try:
        with scratch_database(server_url, "conveyor_test") as database_url:
            upgrade(database_url)
            yield Backends(database_url, redis_url)
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture(autouse=True)
def _fresh_layout(request: pytest.FixtureRequest) -> None:
    """A test database is one deployment, yet every test has a Redis prefix of its own:
    forget the stream layout (``app.jobs.layout``) that the previous test's processes
    recorded, so that this test's first process records its own."""
    urls = set()
    if "backends" in request.fixturenames:
        urls.add(request.getfixturevalue("backends").database_url)
    if "settings" in request.fixturenames:  # a test module may use a database of its own
        urls.add(request.getfixturevalue("settings").database_url)
    for url in urls:
        asyncio.run(db.execute(url, "DELETE FROM conveyor_state WHERE key = 'stream-layout'"))


def make_settings(backends: Backends, **overrides: Any) -> Settings:
    """Fast timings for tests; each call gets its own Redis key prefix."""
    values: dict[str, Any] = {
        "database_url": backends.database_url,
        "redis_url": backends.redis_url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:10]}",
        "claim_idle_seconds": 2.0,
        "reconcile_seconds": 2.0,
        "retry_base_seconds": 0.2,
        "retry_max_seconds": 2.0,
        "shutdown_grace_seconds": 5.0,
        "dispatch_grace_seconds": 1.0,
        "promote_interval_seconds": 0.1,
        # Half the default pools: scripts/test runs two test processes against one Postgres
        # (max_connections 100), and a test with an API and a few workers would take 60 alone.
        "db_pool_size": 5,
        "db_max_overflow": 5,
        "handler_modules": "tests.support.handlers",
        "api_keys": None,
        "allowed_hosts": "conveyor,testserver,localhost,127.0.0.1,[::1]",  # in-process clients
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(backends: Backends) -> Settings:
    return make_settings(backends)


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own, so counts and workers do not mix between tests."""
    return f"q-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process (lifespan included) behind an httpx client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            yield c


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(settings, tmp_path)
    try:
        yield spawner
    finally:
        spawner.stop_all()


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def wait_for_status(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], timeout: float = 20.0
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        return job if job.get("status") in statuses else None

    result: dict[str, Any] = await wait_until(check, timeout)
    return result


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client of the test's Redis (use the test's own key prefix; never flush)."""
    r = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        yield r
    finally:
        await r.aclose()


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/jobs and insist on 202."""
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job
