"""The ``<prefix>:dlq`` notification stream stays small, and Redis's eviction policy is checked.

The stream is a notification; Postgres keeps each dead job's full error history. An entry holds
the newest errors that fit in a fixed size (the last one with the tail of its traceback), and the
stream holds a bounded number of entries, so producers of failing jobs cannot fill Redis.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from app.devserver import EmbeddedRedis
from app.main import create_app
from app.settings import Settings
from app.streams.dead_letter import DLQ_ENTRY_MAX_BYTES, dead_letter_entry
from app.streams.keys import Keys
from tests.conftest import Backends, make_settings, submit, wait_for_status, wait_until
from tests.support.processes import Spawner


def entry_bytes(fields: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in fields.items())


def test_an_entry_keeps_the_newest_errors_that_fit() -> None:
    errors = [
        {
            "attempt": n,
            "error": f"failure {n} " + "e" * 3000,
            "type": "RuntimeError",
            "traceback": "Traceback (most recent call last):\n" + "f" * 7900 + f"\nend {n}",
            "worker": "host-1-abc",
            "at": "2024-01-01T00:00:00+00:00",
        }
        for n in range(1, 101)
    ]
    entry = dead_letter_entry("job-id", "demo.fail", "default", 100, errors)
    assert entry_bytes(entry) <= DLQ_ENTRY_MAX_BYTES
    assert (entry["job"], entry["type"], entry["queue"], entry["attempts"]) == (
        "job-id",
        "demo.fail",
        "default",
        "100",
    )
    kept = json.loads(entry["errors"])
    assert kept and kept[-1]["attempt"] == 100
    assert kept[-1]["error"].startswith("failure 100 ")
    assert kept[-1]["traceback"].endswith("\nend 100"), "the tail of the last traceback stays"
    assert all("traceback" not in e for e in kept[:-1])
    assert int(entry["errors_omitted"]) == 100 - len(kept)
    small = dead_letter_entry("j", "t", "q", 2, [{"attempt": 1, "error": "a"}, {"attempt": 2}])
    assert [e["attempt"] for e in json.loads(small["errors"])] == [1, 2]
    assert small["errors_omitted"] == "0"


@pytest.fixture
def settings(backends: Backends) -> Settings:
    return make_settings(backends, stream_maxlen=100)


async def test_dlq_stream_entries_and_length_are_bounded(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    spawn.worker([queue], concurrency=32)
    big = await submit(
        client,
        {
            "type": "demo.fail",
            "queue": queue,
            "max_attempts": 6,
            "payload": {"message": "m" * 2000},
        },
    )
    dead = await wait_for_status(client, big["id"], {"dead"}, timeout=60)
    assert len(dead["errors"]) == 6
    assert all(len(e["traceback"]) > 2000 for e in dead["errors"]), "Postgres keeps it all"
    dlq = Keys(settings.redis_prefix).dlq

    async def notified() -> list[dict[str, str]]:
        entries: list[tuple[str, dict[str, str]]] = await redis.xrange(dlq)  # type: ignore[assignment]
        return [fields for _, fields in entries if fields.get("job") == big["id"]]

    [entry] = await wait_until(notified, timeout=20)
    assert entry_bytes(entry) <= DLQ_ENTRY_MAX_BYTES
    assert json.loads(entry["errors"])[-1]["attempt"] == 6

    item = {"type": "test.permanent", "queue": queue, "payload": {}}
    response = await client.post("/v1/jobs/batch", json={"jobs": [item] * 150})
    assert response.status_code == 202, response.text

    async def all_dead() -> bool:
        stats = (await client.get("/v1/queues")).json()["items"]
        return any(q["queue"] == queue and q["dead"] == 151 for q in stats)

    await wait_until(all_dead, timeout=60, interval=0.3)

    async def all_notified() -> bool:
        info = await redis.xinfo_stream(dlq)
        return int(info["entries-added"]) == 151

    await wait_until(all_notified, timeout=20)
    assert await redis.xlen(dlq) == 100, "trimmed to CONVEYOR_STREAM_MAXLEN (at most 10,000)"


@pytest.fixture
async def evicting_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis of this test's own, set to evict keys under memory pressure."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    url = server.start()
    r = Redis.from_url(url)
    try:
        await r.config_set("maxmemory-policy", "allkeys-lru")
        acl = ["ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-config"]
        await r.execute_command(*acl)  # type: ignore[no-untyped-call]
        yield url
    finally:
        await r.aclose()
        server.stop()


async def test_startup_warns_when_redis_may_evict_keys(
    backends: Backends,
    evicting_redis: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(backends, redis_url=evicting_redis)
    caplog.set_level(logging.DEBUG, logger="app.streams.client")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    [warning] = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "allkeys-lru" in warning.getMessage() and "noeviction" in warning.getMessage()

    spawner = Spawner(settings, tmp_path)
    try:
        worker = spawner.worker(["q-evict"])

        async def warned() -> bool:
            return "maxmemory-policy" in worker.output()

        await wait_until(warned, timeout=30)
        assert "allkeys-lru" in worker.output()
    finally:
        spawner.stop_all()

    # CONFIG refused (a managed Redis): a debug line, and the API starts as usual
    caplog.clear()
    limited = evicting_redis.replace("redis://", "redis://limited:pw@")
    # (the same deployment: its stream layout, prefix included, is recorded in Postgres)
    app = create_app(make_settings(backends, redis_url=limited, redis_prefix=settings.redis_prefix))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as c:
            assert (await c.get("/readyz")).status_code == 200
    checks = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert checks and all(r.levelno == logging.DEBUG for r in checks)


async def test_no_warning_when_redis_never_evicts(
    backends: Backends, evicting_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = Redis.from_url(evicting_redis)
    try:
        await r.config_set("maxmemory-policy", "noeviction")
    finally:
        await r.aclose()
    caplog.set_level(logging.DEBUG, logger="app.streams.client")
    app = create_app(make_settings(backends, redis_url=evicting_redis))
    async with app.router.lifespan_context(app):
        pass
    assert not [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
