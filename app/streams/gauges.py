"""Stream figures for the metrics snapshot: length, pending entries, consumer-group lag."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.streams.client import StreamClient
from app.streams.keys import GROUP


@dataclass(frozen=True, slots=True)
class StreamStats:
    length: int
    pending: int
    lag: int | None  # entries not yet delivered to the group (Redis >= 7; None if unknown)


async def stream_stats(stream: StreamClient, streams: Sequence[str]) -> list[StreamStats]:
    """One pipeline: XLEN and XINFO GROUPS of each stream (a missing stream counts 0)."""
    if not streams:
        return []
    async with stream.redis.pipeline(transaction=False) as pipe:
        for name in streams:
            pipe.xlen(name)
            pipe.xinfo_groups(name)
        replies = await pipe.execute(raise_on_error=False)
    stats = []
    for i in range(len(streams)):
        length, groups = replies[2 * i], replies[2 * i + 1]
        ours = [g for g in groups if g.get("name") == GROUP] if isinstance(groups, list) else []
        group = ours[0] if ours else {}
        lag = group.get("lag")
        stats.append(
            StreamStats(
                length if isinstance(length, int) else 0,
                int(group.get("pending") or 0),
                int(lag) if lag is not None else None,
            )
        )
    return stats
