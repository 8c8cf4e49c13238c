"""StreamClient.dispatch: the Lua script is loaded once, not checked per pipeline, and a
server that lost its scripts (a restart, SCRIPT FLUSH) gets it again without losing a send.
StreamClient.ack and .read: a job-change message rides in their round trip."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from app.devserver.valkey import EmbeddedRedis
from app.streams.client import StreamClient
from app.streams.keys import GROUP, Keys
from app.streams.notify import Announcement, Change, decode, encode


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[Redis]:
    """A server of this test's own: it is flushed of scripts and its stats are reset."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    server.start()
    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.aclose()
        server.stop()


async def _calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    entry = stats.get(f"cmdstat_{command}", {})
    return int(entry.get("calls", 0)) if isinstance(entry, dict) else 0


async def test_dispatch_loads_the_script_once_and_survives_a_script_flush(
    own_redis: Redis,
) -> None:
    client = StreamClient(own_redis, Keys("t"), maxlen=1000)
    streams = [client.keys.stream("q", 0, band) for band in (0, 1, 2)]
    await own_redis.config_resetstat()
    for _ in range(5):
        ids = [uuid.uuid4() for _ in range(6)]
        sent = await client.dispatch([(streams[i % 3], job) for i, job in enumerate(ids)])
        assert set(sent) == set(ids)
    assert await _calls(own_redis, "script|exists") == 0
    assert await _calls(own_redis, "script|load") == 1  # the first pipeline met NOSCRIPT
    await own_redis.script_flush()
    ids = [uuid.uuid4() for _ in range(6)]
    sent = await client.dispatch([(streams[i % 3], job) for i, job in enumerate(ids)])
    assert set(sent) == set(ids)
    assert await _calls(own_redis, "script|load") == 2
    assert [await own_redis.xlen(s) for s in streams] == [12, 12, 12]


async def _message(pubsub: PubSub) -> Change | None:
    """The next message on the subscription (the subscribe confirmation is skipped)."""
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.1)
        if message is not None:
            return decode(message["data"])
    return None


async def _reads(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_reads_processed"])


async def test_ack_sends_its_job_change_message_in_the_same_round_trip(
    own_redis: Redis,
) -> None:
    """A worker's outcome batch costs one round trip for its XACK, XDEL and job-change
    message; the message arrives, and the entries are gone."""
    client = StreamClient(own_redis, Keys("t"), maxlen=1000)
    stream = client.keys.stream("q", 0, 1)
    await client.ensure_groups([stream])
    job = uuid.uuid4()
    await client.dispatch([(stream, job)])
    [delivery] = await client.read([stream], "w1", count=10, block_ms=None)
    pubsub = own_redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("t:jobs-changed")
    announce = Announcement("t:jobs-changed", encode([job]))
    await own_redis.config_resetstat()
    before = await _reads(own_redis)
    await client.ack([delivery], announce)
    after = await _reads(own_redis)
    assert after - before == 2  # the ack's round trip and the second INFO
    assert await _message(pubsub) == Change(frozenset([job]))
    assert await own_redis.xlen(stream) == 0
    assert (await own_redis.xpending(stream, GROUP))["pending"] == 0
    # Nothing to ack: the message goes alone.
    await client.ack([], announce)
    assert await _message(pubsub) == Change(frozenset([job]))
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_read_sends_a_job_change_message_in_the_same_round_trip(
    own_redis: Redis,
) -> None:
    """A claim's message that had no ack to ride with goes with the worker's next read: one
    round trip for both, the message arrives at once even when the read blocks, and the
    read still returns what the stream delivers."""
    client = StreamClient(own_redis, Keys("t"), maxlen=1000)
    stream = client.keys.stream("q", 0, 1)
    await client.ensure_groups([stream])
    pubsub = own_redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("t:jobs-changed")
    first, second = uuid.uuid4(), uuid.uuid4()
    await client.dispatch([(stream, first)])
    announce = Announcement("t:jobs-changed", encode([], [first]))
    await own_redis.config_resetstat()
    before = await _reads(own_redis)
    [delivery] = await client.read([stream], "w1", 10, None, announce)
    after = await _reads(own_redis)
    assert after - before == 2  # the read's round trip and the second INFO
    assert delivery.job_id == first
    assert await _message(pubsub) == Change(changed=frozenset([first]))

    # A blocking read: the message is published before the read waits.
    blocked = asyncio.create_task(client.read([stream], "w1", 10, 5000, announce))
    assert await _message(pubsub) == Change(changed=frozenset([first]))
    assert not blocked.done()
    await client.dispatch([(stream, second)])
    [woken] = await asyncio.wait_for(blocked, 5)
    assert woken.job_id == second
    await pubsub.aclose()  # type: ignore[no-untyped-call]
