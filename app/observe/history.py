"""The last hour, minute by minute, for the dashboard's charts: succeeded jobs and failed
attempts per minute, and the queue wait's p50 and p99.

The shared tallies (:mod:`app.observe.tally`) only ever grow. Whenever a process refreshes its
metrics snapshot it keeps the current totals as the sample of the current minute, unless a
process kept one already (``SET NX``, two hours to live); a point of a chart is the difference
between a minute's sample and the previous one kept, spread over the minutes between them. So
the charts cost one small Redis read per snapshot, whatever the number of jobs, API processes
or open dashboards, and survive a restart of the API (decision 0021).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from app.observe import families
from app.observe.tally import SEP
from app.streams import tallies
from app.streams.client import StreamClient

log = logging.getLogger(__name__)

MINUTES = 60
KEEP_SECONDS = 2 * 3600
LIVE_AFTER_SECONDS = 5.0
NOT_FAILURES = frozenset({"fenced"})  # a stale attempt's outcome, discarded: not a failure
WAIT_BOUNDS = (*families.QUEUE_WAIT.buckets, math.inf)


@dataclass(frozen=True)
class Totals:
    at: float = 0.0  # when taken (seconds since the epoch)
    succeeded: float = 0.0
    failed: float = 0.0
    wait: tuple[float, ...] = (0.0,) * len(WAIT_BOUNDS)  # per bucket, not cumulative

    def encode(self) -> str:
        return json.dumps(
            {"t": self.at, "s": self.succeeded, "f": self.failed, "w": list(self.wait)}
        )

    @classmethod
    def decode(cls, raw: str) -> Totals | None:
        try:
            data = json.loads(raw)
            wait = tuple(float(v) for v in data["w"])
            if len(wait) != len(WAIT_BOUNDS):
                return None
            return cls(float(data["t"]), float(data["s"]), float(data["f"]), wait)
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Point:
    at: float  # the end of the interval, seconds since the epoch
    succeeded: float  # per minute
    failed: float
    wait_p50: float | None  # seconds; None: nothing started
    wait_p99: float | None


def totals(values: Mapping[str, str], at: float) -> Totals:
    """Sum the tally fields over every queue and type."""
    succeeded = failed = 0.0
    wait = [0.0] * len(WAIT_BOUNDS)
    for name, value in values.items():
        parts = name.split(SEP)
        if parts[0] == families.SUCCEEDED.name:
            succeeded += float(value)
        elif parts[0] == families.FAILED.name and parts[-1] not in NOT_FAILURES:
            failed += float(value)
        elif parts[0] == families.QUEUE_WAIT.name and parts[-1].startswith("b"):
            i = int(parts[-1][1:])
            if 0 <= i < len(wait):
                wait[i] += float(value)
    return Totals(at, succeeded, failed, tuple(wait))


def quantile(q: float, counts: tuple[float, ...]) -> float | None:
    """As Prometheus' ``histogram_quantile``: linear within the bucket that holds it."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen, lower = q * total, 0.0, 0.0
    for count, upper in zip(counts, WAIT_BOUNDS, strict=True):
        if count > 0 and seen + count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last bound: its lower edge, as Prometheus does
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return lower


def between(before: Totals, after: Totals) -> Point:
    minutes = max(after.at - before.at, 1.0) / 60
    wait = tuple(max(0.0, a - b) for a, b in zip(after.wait, before.wait, strict=True))
    return Point(
        at=after.at,
        succeeded=max(0.0, after.succeeded - before.succeeded) / minutes,
        failed=max(0.0, after.failed - before.failed) / minutes,
        wait_p50=quantile(0.5, wait),
        wait_p99=quantile(0.99, wait),
    )


def points(samples: list[Totals], now: Totals) -> list[Point]:
    """One point per interval between samples kept, and one from the last to ``now`` (the
    minute under way) once it is a few seconds long."""
    ordered = sorted(samples, key=lambda t: t.at)
    out = [between(a, b) for a, b in itertools.pairwise(ordered)]
    if ordered and now.at - ordered[-1].at >= LIVE_AFTER_SECONDS:
        out.append(between(ordered[-1], now))
    return out


async def record_and_read(stream: StreamClient, now: float) -> list[Point]:
    """Keep this minute's sample (if none is kept yet) and return the last hour's points."""
    minute = int(now // 60)
    current = totals(await tallies.read(stream), now)
    await tallies.mark_minute(stream, minute, current.encode(), KEEP_SECONDS)
    raw = await tallies.minutes(stream, minute - MINUTES, minute)
    return points([t for v in raw.values() if (t := Totals.decode(v)) is not None], current)
