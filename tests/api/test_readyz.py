"""/readyz follows Redis: 503 while the test's own Redis is stopped or frozen, 200 once back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from app.devserver import EmbeddedRedis
from app.main import create_app
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_until


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    redis = EmbeddedRedis(tmp_path / "redis", persistent=False)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()  # also wakes a paused server first


@pytest.fixture
async def api(backends: Backends, own_redis: EmbeddedRedis) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(backends, redis_url=own_redis.url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            yield c


async def _status_is(api: httpx.AsyncClient, code: int) -> httpx.Response | None:
    response = await api.get("/readyz")
    return response if response.status_code == code else None


async def test_readyz_is_503_while_redis_is_stopped_and_200_after_restart(
    api: httpx.AsyncClient, own_redis: EmbeddedRedis
) -> None:
    ok = await wait_until(lambda: _status_is(api, 200), timeout=20)
    assert ok.json() == {"status": "ok", "postgres": True, "redis": True}

    own_redis.stop()
    down = await wait_until(lambda: _status_is(api, 503), timeout=20, interval=0.2)
    assert down.json() == {"status": "unavailable", "postgres": True, "redis": False}
    assert (await api.get("/healthz")).status_code == 200  # liveness does not depend on Redis

    own_redis.start()  # same port, as a restarted server would be
    back = await wait_until(lambda: _status_is(api, 200), timeout=30, interval=0.2)
    assert back.json()["redis"] is True


async def test_readyz_is_503_while_redis_hangs(
    api: httpx.AsyncClient, own_redis: EmbeddedRedis
) -> None:
    await wait_until(lambda: _status_is(api, 200), timeout=20)

    own_redis.pause()  # connections hang instead of failing: the check must time out
    try:
        down = await wait_until(lambda: _status_is(api, 503), timeout=20, interval=0.2)
        assert down.json()["redis"] is False
    finally:
        own_redis.resume()
    await wait_until(lambda: _status_is(api, 200), timeout=30, interval=0.2)
