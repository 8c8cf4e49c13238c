"""The shared tallies: one Redis hash, ``<prefix>:metrics``, of counters and histogram buckets
that every process (API and worker) adds to, and any API process reads whole at a scrape.

Fields are opaque to this module (see :mod:`app.observe.tally`). One flush is one MULTI/EXEC
on the one key, so it is applied whole or not at all (and works on Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Mapping

from app.streams.client import StreamClient


async def add(stream: StreamClient, counts: Mapping[str, int], sums: Mapping[str, float]) -> None:
    """HINCRBY every count and HINCRBYFLOAT every sum, in one round trip."""
    if not counts and not sums:
        return
    name = stream.keys.metrics
    async with stream.redis.pipeline(transaction=True) as pipe:
        for field, n in counts.items():
            pipe.hincrby(name, field, n)
        for field, value in sums.items():
            pipe.hincrbyfloat(name, field, value)
        await pipe.execute()


async def read(stream: StreamClient) -> dict[str, str]:
    raw = await stream.redis.hgetall(stream.keys.metrics)
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
