"""StreamClient.dispatch: the Lua script is loaded once, not checked per pipeline, and a
server that lost its scripts (a restart, SCRIPT FLUSH) gets it again without losing a send."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.devserver.valkey import EmbeddedRedis
from app.streams.client import BandReadError, StreamClient
from app.streams.keys import Keys


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


async def _partition(redis: Redis) -> tuple[StreamClient, list[str]]:
    """A client and the band streams of one partition, with their consumer groups."""
    client = StreamClient(redis, Keys("t"), maxlen=1000)
    streams = client.keys.partition_streams("q", 0)
    await client.ensure_groups(streams)
    return client, streams


async def test_read_bands_takes_the_highest_bands_first_in_one_round_trip(
    own_redis: Redis,
) -> None:
    client, streams = await _partition(own_redis)
    sent = {band: [uuid.uuid4() for _ in range(4)] for band in range(3)}  # four jobs in each band
    for band, ids in sent.items():
        await client.dispatch([(streams[band], job) for job in ids])
    await client.read_bands(client.keys.partition_streams("warm", 0), "c1", 1)  # loads it
    await own_redis.config_resetstat()
    got = await client.read_bands(streams, "c1", 6)
    assert [d.job_id for d in got] == sent[0] + sent[1][:2]
    assert [d.stream for d in got] == [streams[0]] * 4 + [streams[1]] * 2
    assert await _calls(own_redis, "evalsha") == 1  # one round trip for two bands
    assert await _calls(own_redis, "xreadgroup") == 2  # the third band was not needed
    rest = await client.read_bands(streams, "c1", 100)
    assert [d.job_id for d in rest] == sent[1][2:] + sent[2]
    assert await client.read_bands(streams, "c1", 100) == []
    # the entries are pending on the consumer that read them, as with XREADGROUP
    pending = await own_redis.xpending(streams[2], "conveyor")
    assert pending["pending"] == 4


async def test_read_bands_keeps_earlier_bands_entries_when_a_later_read_fails(
    own_redis: Redis,
) -> None:
    client, streams = await _partition(own_redis)
    job = uuid.uuid4()
    await client.dispatch([(streams[0], job)])
    # band 1 lost its group (a stream deleted): it is recreated, band 0's entry is returned
    await own_redis.delete(streams[1])
    got = await client.read_bands(streams, "c1", 10)
    assert [d.job_id for d in got] == [job]
    assert client.data_loss.is_set()
    assert await own_redis.xinfo_groups(streams[1])  # the group is back
    # any other error is raised, carrying what the earlier bands gave
    later = uuid.uuid4()
    await client.dispatch([(streams[0], later)])
    await own_redis.delete(streams[2])
    await own_redis.set(streams[2], "not a stream")
    with pytest.raises(BandReadError) as failed:
        await client.read_bands(streams, "c1", 10)
    assert "WRONGTYPE" in str(failed.value)
    assert [d.job_id for d in failed.value.deliveries] == [later]


async def test_ack_sends_the_job_change_message_in_the_same_round_trip(
    own_redis: Redis,
) -> None:
    client, streams = await _partition(own_redis)
    await client.dispatch([(streams[1], uuid.uuid4()) for _ in range(3)])
    got = await client.read_bands(streams, "c1", 10)
    pubsub = own_redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("changes")
    try:
        await client.ack(got, notice=("changes", "hello"))
        message = None
        for _ in range(50):  # the subscription's confirmation comes first (and is skipped)
            if message := await pubsub.get_message(timeout=0.1):
                break
        assert message is not None and message["data"] == "hello"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert await own_redis.xlen(streams[1]) == 0  # acked and deleted
    assert (await own_redis.xpending(streams[1], "conveyor"))["pending"] == 0
