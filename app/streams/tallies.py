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


async def mark_minute(stream: StreamClient, minute: int, value: str, ttl: int) -> None:
    """Keep ``value`` as the minute's sample unless one is kept already (the first wins)."""
    await stream.redis.set(stream.keys.history(minute), value, nx=True, ex=ttl)


async def minutes(stream: StreamClient, first: int, last: int) -> dict[int, str]:
    """The samples kept for the minutes ``first..last``, in one MGET."""
    span = list(range(first, last + 1))
    values = await stream.redis.mget([stream.keys.history(m) for m in span])
    return {m: _text(v) for m, v in zip(span, values, strict=True) if v is not None}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
