"""The flow controls a worker obeys, cached: paused queues and the limits in force.

Read from Postgres once before the first read and then every poll interval
(``CONVEYOR_PROMOTE_INTERVAL_SECONDS``), so a pause, a resume or a limit change reaches every
worker within about one interval, without a restart. The hot path only looks at the cache:
with no pause and no limit it costs no round trip at all.

Jobs a limit held back are sent again by :class:`Resender` once room is likely (ADR 0014).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Sequence

import asyncpg

from app.flow.claim import Held, Key
from app.flow.limits import Limits, in_force
from app.jobs.dispatch import Dispatcher
from app.jobs.registry import Registry
from app.jobs.repository import Target

log = logging.getLogger(__name__)

RESEND_TICK_SECONDS = 0.05

_READ = """
SELECT scope, name, paused, limits_set, concurrency, rate_count, rate_period, burst
FROM flow_controls WHERE paused OR limits_set
"""


class Controls:
    """Paused queues and the limits in force (declared in code, or set over HTTP)."""

    def __init__(self, registry: Registry, queues: Sequence[str]) -> None:
        self.registry = registry
        self.queues = set(queues)  # the limits of other queues do not concern this worker
        self.paused: frozenset[str] = frozenset()
        self.limits: dict[Key, Limits] = {}
        self.changed = asyncio.Event()  # set by each refresh that changed something

    async def refresh(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(_READ)
        paused = frozenset(r["name"] for r in rows if r["scope"] == "queue" and r["paused"])
        overrides = {
            (r["scope"], r["name"]): Limits(
                r["concurrency"], r["rate_count"], r["rate_period"], r["burst"]
            )
            for r in rows
            if r["limits_set"]
        }
        limits: dict[Key, Limits] = {}
        for job_type in self.registry.all():
            key = ("type", job_type.name)
            found = in_force(job_type.limits, overrides.pop(key, None))
            if found.any:
                limits[key] = found
        limits.update(
            (k, v)
            for k, v in overrides.items()
            if v.any and (k[0] == "type" or k[1] in self.queues)
        )
        if paused != self.paused or limits != self.limits:
            log.info(
                "flow controls: paused=%s limits=%s",
                ",".join(sorted(paused)) or "-",
                ",".join(f"{s}:{n}" for s, n in sorted(limits)) or "-",
            )
            self.paused, self.limits = paused, limits
            self.changed.set()

    async def until_changed(self, most_seconds: float) -> None:
        """Wait for the next refresh that changes something (or ``most_seconds``)."""
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(most_seconds):
                await self.changed.wait()


class Resender:
    """Sends held-back jobs to their streams again when their delay is up.

    Only delays shorter than the dispatch grace are kept here; longer ones (and all of them,
    should this worker die) are left to the dispatch sweep, which :data:`app.flow.claim._HOLD`
    has told to wait just as long."""

    def __init__(self, dispatcher: Dispatcher, dispatch_grace: float) -> None:
        self.dispatcher = dispatcher
        self.dispatch_grace = dispatch_grace
        self._due: list[tuple[float, int, Target]] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._due)

    def later(self, held: Sequence[Held]) -> None:
        now = time.monotonic()
        for h in held:
            if h.delay < self.dispatch_grace:
                self._count += 1
                heapq.heappush(self._due, (now + h.delay, self._count, h.target))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RESEND_TICK_SECONDS)
            now = time.monotonic()
            due: list[Target] = []
            while self._due and self._due[0][0] <= now:
                due.append(heapq.heappop(self._due)[2])
            if not due:
                continue
            try:
                await self.dispatcher.send_committed(due)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the sweep sends them after the grace
                log.warning("could not re-send %d held job(s): %s", len(due), exc)
