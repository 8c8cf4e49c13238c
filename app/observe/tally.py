"""Counting without a round trip per job: a process adds to local dicts, and one background
task sends what accumulated to the shared Redis hash (:mod:`app.streams.tallies`) in one
MULTI/EXEC, at once when idle and at most every :data:`MIN_GAP` seconds under load. So a
worker's completion batch of hundreds of jobs costs one pipeline, shared with everything else
counted meanwhile, and the API's scrape reads every process's counts, however many there are
(decision 0018).

A process keeps what it could not send (Redis down) and sends it with the next flush. What a
process counted in its last :data:`MIN_GAP` is lost if it is SIGKILLed; Redis losing its data
resets the counters (Prometheus treats that as a counter reset).

One :data:`TALLY` per process; the API lifespan and the worker start and stop it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict

from app.observe.families import Family
from app.streams import tallies
from app.streams.client import StreamClient

log = logging.getLogger(__name__)

MIN_GAP = 0.2  # seconds between two flushes
RETRY_PAUSE = 1.0
SEP = "\x1f"  # between the parts of a field name; never in a label value


def clean(value: str) -> str:
    return value.replace(SEP, "?")


def field(family: Family, labels: tuple[str, ...]) -> str:
    return SEP.join((family.name, *map(clean, labels)))


class Tally:
    def __init__(self) -> None:
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.sums: defaultdict[str, float] = defaultdict(float)
        self.totals: defaultdict[str, float] = defaultdict(float)  # this process, since it began
        self._names: dict[tuple[str, tuple[str, ...]], str] = {}
        self._stream: StreamClient | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._users = 0  # owners that started it (the API lifespan, the worker)

    # -- recording (no I/O) ------------------------------------------------------------------

    def count(self, family: Family, labels: tuple[str, ...], n: int = 1) -> None:
        if n:
            self.counts[self._field(family, labels)] += n
            self._poke()

    def observe(self, family: Family, labels: tuple[str, ...], seconds: float) -> None:
        base = self._field(family, labels)
        index = bisect.bisect_left(family.buckets, seconds)  # le: value <= bound
        self.counts[f"{base}{SEP}b{index}"] += 1
        self.sums[f"{base}{SEP}sum"] += seconds
        self._poke()

    def _field(self, family: Family, labels: tuple[str, ...]) -> str:
        key = (family.name, labels)
        name = self._names.get(key)
        if name is None:  # label values are bounded, and so is this cache
            name = self._names[key] = field(family, labels)
        return name

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- sending -----------------------------------------------------------------------------

    def start(self, stream: StreamClient) -> None:
        """Send to ``stream``'s Redis from now on (counts made before are sent too). A
        second owner in the same process (two apps in one test) shares the first's."""
        self._users += 1
        if self._users > 1:
            return
        self._stream = stream
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="tally-flush")
        self._wake.set()

    async def stop(self) -> None:
        """Stop the background task and send what is left (once; failures are logged)."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
        if self._task is not None and self._lock is not None:
            async with self._lock:  # never cut a flush short: it may have been applied
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.warning("metrics not sent on shutdown: %s", type(exc).__name__)
        self._wake = None

    async def flush(self) -> None:
        """Send what accumulated; on failure keep it for the next flush, and raise."""
        stream, lock = self._stream, self._lock
        if stream is None or lock is None:
            return
        async with lock:
            counts, self.counts = self.counts, defaultdict(int)
            sums, self.sums = self.sums, defaultdict(float)
            try:
                await tallies.add(stream, counts, sums)
            except BaseException:
                for k, n in counts.items():
                    self.counts[k] += n
                for k, v in sums.items():
                    self.sums[k] += v
                raise
            for source in (counts, sums):
                for k, v in source.items():
                    self.totals[k] += v

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.debug("metrics flush failed (%s); kept for the next one", type(exc).__name__)
                await asyncio.sleep(RETRY_PAUSE)
                self._wake.set()
            await asyncio.sleep(MIN_GAP)


TALLY = Tally()
