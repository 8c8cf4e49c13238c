"""The figures a scrape needs from Postgres and from the streams, taken at most once per
``CONVEYOR_METRICS_SNAPSHOT_SECONDS`` per API process, however many scrapers (or dashboard
tabs) ask: concurrent callers share one refresh, and later ones get the cached copy.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import WorkerRow
from app.flow import service as flow
from app.jobs import queries
from app.observe import history
from app.observe.history import Point
from app.settings import Settings
from app.streams.client import StreamClient
from app.streams.gauges import StreamStats, stream_stats
from app.streams.keys import BANDS

QUEUED_AGES = text(
    "SELECT queue,"
    " extract(epoch FROM now() - min(enqueued_at))::float8 AS oldest,"
    " count(*) FILTER (WHERE dispatched_at IS NULL) AS undispatched,"
    " extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE dispatched_at IS NULL))::float8"
    " AS oldest_undispatched"
    " FROM jobs WHERE status = 'queued' GROUP BY queue"
)


RUNNING = text(
    "SELECT id, type, queue, worker, owner, started_at FROM jobs WHERE status = 'running'"
    " ORDER BY started_at LIMIT :limit"
)
RUNNING_SHOWN = 500  # the dashboard's workers page lists at most this many running jobs


@dataclass
class Snapshot:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # queue -> status -> n
    oldest_queued: dict[str, float] = field(default_factory=dict)  # queue -> seconds
    undispatched: dict[str, tuple[int, float]] = field(default_factory=dict)  # n, oldest age
    streams: dict[tuple[str, int], StreamStats] = field(default_factory=dict)  # (queue, band)
    workers: int = 0
    free_slots: int = 0
    live: list[WorkerRow] = field(default_factory=list)  # the live workers, by name
    running: list[Row[tuple[object, ...]]] = field(default_factory=list)  # oldest first
    history: list[Point] = field(default_factory=list)  # the last hour (the dashboard)
    paused: set[str] = field(default_factory=set)  # paused queues
    controlled: set[str] = field(default_factory=set)  # queues with a pause or limits
    taken_at: float = 0.0  # monotonic

    @property
    def queues(self) -> list[str]:
        return sorted({*self.counts, *(q for q, _ in self.streams)})


class Snapshots:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        stream: StreamClient,
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.stream = stream
        self.settings = settings
        self.max_age = settings.metrics_snapshot_seconds
        self._current: Snapshot | None = None
        self._lock = asyncio.Lock()
        self.refreshes = 0

    def age(self) -> float | None:
        return None if self._current is None else time.monotonic() - self._current.taken_at

    async def get(self) -> Snapshot:
        """The cached snapshot, refreshed first if older than the limit."""
        if (current := self._fresh()) is not None:
            return current
        async with self._lock:
            if (current := self._fresh()) is not None:
                return current
            self._current = await self._take()
            self.refreshes += 1
            return self._current

    def invalidate(self) -> None:
        """The next :meth:`get` takes a new snapshot (after a change the dashboard made)."""
        self._current = None

    def _fresh(self) -> Snapshot | None:
        current = self._current
        if current is not None and time.monotonic() - current.taken_at < self.max_age:
            return current
        return None

    async def _take(self) -> Snapshot:
        snap = Snapshot()
        async with self.sessions() as session:
            snap.counts = await queries.queue_counts(session)
            for row in await session.execute(QUEUED_AGES):
                snap.oldest_queued[row.queue] = max(0.0, row.oldest or 0.0)
                snap.undispatched[row.queue] = (
                    int(row.undispatched),
                    max(0.0, row.oldest_undispatched or 0.0),
                )
            live = await queries.live_workers(session, self.settings.claim_idle_seconds)
            snap.running = list(await session.execute(RUNNING, {"limit": RUNNING_SHOWN}))
            controls = await flow.controls(session, "queue")
        snap.controlled = set(controls)
        snap.paused = {q for q, c in controls.items() if c.paused}
        snap.live = live
        snap.workers = len(live)
        snap.free_slots = sum(max(0, w.concurrency - w.in_flight) for w in live)
        served = {q for w in live for q in w.queues}
        await self._streams(snap, sorted({*snap.counts, *served}))
        snap.history = await history.record_and_read(self.stream, time.time())
        snap.taken_at = time.monotonic()
        return snap

    async def _streams(self, snap: Snapshot, queues: list[str]) -> None:
        keys, partitions = self.stream.keys, self.settings.partitions
        names: list[tuple[str, int, str]] = [
            (q, band, keys.stream(q, p, band))
            for q in queues
            for p in range(partitions)
            for band in BANDS
        ]
        stats = await stream_stats(self.stream, [n for _, _, n in names])
        total: defaultdict[tuple[str, int], list[int | None]] = defaultdict(lambda: [0, 0, 0])
        for (q, band, _), s in zip(names, stats, strict=True):
            t = total[(q, band)]
            t[0] = (t[0] or 0) + s.length
            t[1] = (t[1] or 0) + s.pending
            t[2] = None if s.lag is None or t[2] is None else t[2] + s.lag
        snap.streams = {k: StreamStats(v[0] or 0, v[1] or 0, v[2]) for k, v in total.items()}
