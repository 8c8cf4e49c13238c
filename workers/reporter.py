"""The reporter: writes attempt outcomes to Postgres in batches, then acks their entries.

Only this module reports outcomes of attempts this worker ran: one fenced statement per batch
(``attempts.complete_many``), then XACK + XDEL of the entries whose outcome was written, in
one pipeline. It also owns the notification of dead jobs on ``<prefix>:dlq`` (a notification:
the DLQ of record is the ``dead`` status), whichever path made them dead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from uuid import UUID

from app.db import errors as db_errors
from app.jobs import attempts, unknown_type
from app.jobs.attempts import Completion, Dead
from app.streams.notify import Announcement
from workers import telemetry
from workers.context import Running, WorkerContext
from workers.execution import error_record, failed

log = logging.getLogger(__name__)

REPORT_BATCH = 1000
REPORT_FLUSH_SECONDS = 10.0  # on shutdown, how long the reporter may take to write what it holds
RETRY_PAUSE = 1.0

Report = tuple[Completion, Running]


class Reporter:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._pending: list[Report] = []
        self._writing: list[Report] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing pending, nothing being written
        self._idle.set()

    def put(self, completion: Completion, entry: Running) -> None:
        self._pending.append((completion, entry))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:REPORT_BATCH]
                del self._pending[:REPORT_BATCH]
                self._writing = batch
                await self._write(batch)
                self._writing = []
            self._idle.set()

    async def _write(self, batch: list[Report]) -> None:
        while True:
            try:
                await self._report_or_split(batch)
                return
            except Exception as exc:  # keep the outcomes until Postgres takes them
                log.warning("reporting %d outcome(s) failed (%s); retrying", len(batch), exc)
                await asyncio.sleep(RETRY_PAUSE)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Let the reporter write every outcome it was given (a batch cut off mid-write would
        leave finished jobs ``running``), stop it, then try once more for the rest."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=REPORT_FLUSH_SECONDS)
        except TimeoutError:
            log.warning("outcomes not written on shutdown; their leases will lapse")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        rest = self._writing + self._pending
        self._writing, self._pending = [], []
        try:
            await self._report(rest)
        except Exception as exc:
            log.warning("%d outcome(s) not written on shutdown (%s)", len(rest), exc)

    async def _report_or_split(self, batch: list[Report]) -> None:
        """Report a batch; if Postgres refuses its data (not a connection problem), report
        one by one so a single unstorable outcome cannot hold back the others forever."""
        try:
            await self._report(batch)
            return
        except Exception as exc:
            if not db_errors.is_data_error(exc):
                raise
            log.warning(
                "Postgres refused a batch of outcomes (%s); writing one by one",
                db_errors.describe(exc),
            )
        for completion, entry in batch:
            try:
                await self._report([(completion, entry)])
            except Exception as exc:
                if not db_errors.is_data_error(exc):
                    raise
                message = f"outcome could not be stored: {db_errors.describe(exc)}"
                error = error_record(
                    entry.job.attempt, self.ctx.name, message, "OutcomeNotStorable"
                )
                await self._report([(failed(entry.job, error), entry)])

    async def _report(self, batch: list[Report]) -> None:
        if not batch:
            return
        ctx = self.ctx
        known = [c for c, _ in batch if not c.unknown_type]
        unknown = [c for c, _ in batch if c.unknown_type]
        ages: dict[UUID, float] = {}  # end-to-end seconds of the jobs made terminal
        async with ctx.db.acquire() as conn:
            if not unknown:
                moved, dead = await attempts.complete_many(
                    conn,
                    ctx.name,
                    known,
                    ctx.backoff,
                    max_deferrals=ctx.settings.max_deferrals,
                    ages=ages,
                )
            else:  # one transaction: a retry of the batch never finds half of it written
                async with conn.transaction():
                    moved, dead = await attempts.complete_many(
                        conn,
                        ctx.name,
                        known,
                        ctx.backoff,
                        max_deferrals=ctx.settings.max_deferrals,
                        ages=ages,
                    )
                    handed, gone = await unknown_type.hand_back(
                        conn, ctx.name, unknown, ctx.settings.unknown_type_grace_seconds
                    )
                moved |= handed
                dead += gone
        telemetry.reported(batch, moved, dead, ages, ctx.name)
        # A fenced-off delivery may belong to whoever reclaimed it now: leave it to its owner
        # (or to XAUTOCLAIM, whose claim then drops it). The job-change message goes first,
        # in the same round trip.
        done = [e.delivery for c, e in batch if c.id in moved]
        try:
            await ctx.stream.ack(done, self._announcement(known, moved, dead))
        except Exception as exc:  # written already: never redo it; XAUTOCLAIM drops the entries
            log.warning("ack of %d finished entries failed (%s)", len(moved), exc)
        await self.dead_lettered(dead)
        stale = len(batch) - len(moved)
        if stale:
            log.info("%d outcome(s) fenced off: a newer attempt or a cancel won", stale)
        ctx.running.finished([e.attempt for _, e in batch])

    def _announcement(
        self, known: Sequence[Completion], moved: set[UUID], dead: Sequence[Dead]
    ) -> Announcement | None:
        """One job-change message for the batch: the jobs that are terminal now (succeeded or
        dead, or cancelled) wake the API's ``?wait=`` requests; the others (retrying, handed
        back) only the followers of their events. (A failure with attempts left that a cancel
        request turned into ``cancelled`` is left to the API's slow re-check.)"""
        terminal = {c.id for c in known if (c.error is None or c.cancelled) and c.id in moved}
        terminal.update(d.id for d in dead)
        return self.ctx.changes.announcement(terminal, moved - terminal)

    async def dead_lettered(self, jobs: Sequence[Dead]) -> None:
        """Tell ``<prefix>:dlq`` (a notification: the DLQ of record is the ``dead`` status)."""
        for job in jobs:
            try:
                await self.ctx.stream.add_dead_letter(
                    {
                        "job": str(job.id),
                        "type": job.type,
                        "queue": job.queue,
                        "attempts": str(job.attempts),
                        "errors": job.errors,
                    }
                )
            except Exception as exc:
                log.warning("dlq stream notification failed: %s", exc)
