"""Progress of running attempts: coalesced in the worker, written a few times a second at most.

``await ctx.progress(0.4, "resized 4 of 10")`` only records the value in this worker's
buffer (the latest per attempt wins). One loop writes whatever is buffered in one fenced
statement (:func:`app.jobs.attempts.write_progress`), then waits ``FLUSH_SECONDS`` before the
next write, so a job's progress reaches Postgres at most ``1 / FLUSH_SECONDS`` times a second
however often its handler reports. Each write is announced on the job-change channel (one
message per batch), which wakes the SSE followers of those jobs.

Progress is advisory: a write that fails is dropped (the next report brings a newer value),
and a write that finds its attempt fenced off (finished, reclaimed, cancelled) changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging

from app.jobs import attempts
from app.jobs.registry import ProgressSink
from workers.context import Attempt, WorkerContext
from workers.execution import storable

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25


class ProgressWriter:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._pending: dict[Attempt, str] = {}  # attempt -> the latest progress, JSON text
        self._wake = asyncio.Event()
        self.written = 0  # statements run (tests)

    def sink(self, attempt: Attempt) -> ProgressSink:
        """What a handler's ``ctx.progress`` calls for this attempt."""

        def report(value: float, message: str | None) -> None:
            text = None if message is None else storable(message)
            self._pending[attempt] = json.dumps({"value": value, "message": text})
            self._wake.set()

        return report

    def discard(self, attempt: Attempt) -> None:
        """The attempt ended: what it still had buffered is moot."""
        self._pending.pop(attempt, None)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.warning("progress not written (%s); the next report brings it", exc)
            await asyncio.sleep(FLUSH_SECONDS)

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        ctx = self.ctx
        updates = [(job_id, token, text) for (job_id, token), text in batch.items()]
        async with ctx.db.acquire() as conn:
            written = await attempts.write_progress(conn, ctx.name, updates)
        self.written += 1
        await ctx.changes.publish((), written)
