"""The reporter: writes attempt outcomes to Postgres in batches, then acks their entries.

Only this module reports outcomes of attempts this worker ran. It also owns the notification
of dead jobs on ``<prefix>:dlq`` (a notification: the DLQ of record is the ``dead`` status),
whichever path made them dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence

from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError

from app.db.models import JobRow
from app.jobs import repository
from app.jobs.repository import Failure
from app.jobs.status import JobStatus
from app.streams.client import Delivery
from workers.context import WorkerContext
from workers.execution import Outcome, error_record

log = logging.getLogger(__name__)

REPORT_BATCH = 500
REPORT_FLUSH_SECONDS = 10.0  # on shutdown, how long the reporter may take to write what it holds
RETRY_PAUSE = 1.0

Report = tuple[Outcome, Delivery]


class Reporter:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.outcomes: asyncio.Queue[Report] = asyncio.Queue()

    async def put(self, outcome: Outcome, delivery: Delivery) -> None:
        await self.outcomes.put((outcome, delivery))

    async def run(self) -> None:
        while True:
            batch = [await self.outcomes.get()]
            while not self.outcomes.empty() and len(batch) < REPORT_BATCH:
                batch.append(self.outcomes.get_nowait())
            while True:
                try:
                    await self._report_or_split(batch)
                    for _ in batch:
                        self.outcomes.task_done()
                    break
                except Exception as exc:  # keep the outcomes until Postgres takes them
                    log.warning("reporting %d outcome(s) failed (%s); retrying", len(batch), exc)
                    await asyncio.sleep(RETRY_PAUSE)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Let the reporter write every outcome it was given (a batch cut off mid-write would
        leave finished jobs ``running``), stop it, then try once more for the rest."""
        try:
            await asyncio.wait_for(self.outcomes.join(), timeout=REPORT_FLUSH_SECONDS)
        except TimeoutError:
            log.warning("outcomes not written on shutdown; their leases will lapse")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        batch = []
        while not self.outcomes.empty():
            batch.append(self.outcomes.get_nowait())
        with contextlib.suppress(Exception):
            await self._report(batch)

    async def _report_or_split(self, batch: list[Report]) -> None:
        """Report a batch; if Postgres refuses its data (not a connection problem), report
        one by one so a single unstorable outcome cannot hold back the others forever."""
        try:
            await self._report(batch)
            return
        except (DataError, IntegrityError, ProgrammingError) as exc:
            log.warning("Postgres refused a batch of outcomes (%s); writing one by one", exc)
        for outcome, delivery in batch:
            try:
                await self._report([(outcome, delivery)])
            except (DataError, IntegrityError, ProgrammingError) as exc:
                message = f"outcome could not be stored: {type(exc.orig).__name__}"
                error = error_record(outcome.attempt, self.ctx.name, message, "OutcomeNotStorable")
                failed = Outcome(outcome.job_id, outcome.attempt, ok=False, error=error)
                await self._report([(failed, delivery)])

    async def _report(self, batch: list[Report]) -> None:
        if not batch:
            return
        ctx = self.ctx
        wins = [(o.job_id, o.attempt, o.result or "null") for o, _ in batch if o.ok]
        losses = [
            Failure(o.job_id, o.attempt, o.error, o.permanent)
            for o, _ in batch
            if not o.ok and o.error is not None
        ]
        async with ctx.sessions.begin() as session:
            done = await repository.succeed_many(session, ctx.name, wins)
            failed = await repository.fail_many(session, ctx.name, losses, ctx.backoff)
        moved = done | {r.id for r in failed}
        # A fenced-off delivery may belong to whoever reclaimed it now: leave it to its owner
        # (or to XAUTOCLAIM, whose claim then drops it).
        try:
            await ctx.stream.ack([d for o, d in batch if o.job_id in moved])
        except Exception as exc:  # written already: never redo it; XAUTOCLAIM drops the entries
            log.warning("ack of %d finished entries failed (%s)", len(moved), exc)
        await self.dead_lettered([r for r in failed if r.status == JobStatus.DEAD])
        stale = len(batch) - len(moved)
        if stale:
            log.info("%d outcome(s) fenced off: a newer attempt or a cancel won", stale)
        await ctx.running.finished([o.job_id for o, _ in batch])

    async def dead_lettered(self, rows: Sequence[JobRow]) -> None:
        """Tell ``<prefix>:dlq`` (a notification: the DLQ of record is the ``dead`` status)."""
        for row in rows:
            try:
                await self.ctx.stream.add_dead_letter(
                    {
                        "job": str(row.id),
                        "type": row.type,
                        "queue": row.queue,
                        "attempts": str(row.attempts),
                        "errors": json.dumps(row.errors, default=str),
                    }
                )
            except Exception as exc:
                log.warning("dlq stream notification failed: %s", exc)
