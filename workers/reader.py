"""The read side: deliveries in, attempts started.

Two sources deliver entries: one XREADGROUP loop per (queue, partition), highest band first,
and a periodic XAUTOCLAIM of entries idle on dead consumers. Both hand their deliveries to
:meth:`Reader.start`, which claims the jobs in one guarded statement and runs each attempt
won in its own task; the outcome goes to the reporter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs import queries, repository
from app.jobs.registry import Registry
from app.jobs.repository import Target
from app.jobs.status import JobStatus
from app.streams.client import Delivery
from workers.context import Running, WorkerContext
from workers.execution import execute
from workers.maintenance import Maintenance
from workers.reporter import Reporter

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
RETRY_PAUSE = 1.0
STRAY_READ_COUNT = 1000


class Reader:
    def __init__(
        self,
        ctx: WorkerContext,
        registry: Registry,
        reporter: Reporter,
        maintenance: Maintenance,
    ) -> None:
        self.ctx = ctx
        self.registry = registry
        self.reporter = reporter
        self.maintenance = maintenance  # fails lapsed attempts, repairs vanished entries
        idle = ctx.settings.claim_idle_seconds
        self.autoclaim_every = max(0.2, min(idle / 2, 10.0))

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        loops = [self._read_loop(q, p) for q, p in self.ctx.partitions]
        return [*loops, self._autoclaim_loop()]

    # -- source 1: new entries ----------------------------------------------------------------

    async def _read_loop(self, queue: str, partition: int) -> None:
        streams = self.ctx.keys.partition_streams(queue, partition)
        running = self.ctx.running
        while True:
            try:
                want = await running.wait_for_room()
                batch, running.held = running.held[:want], running.held[want:]
                if len(batch) < want:
                    batch += await self._read_by_band(streams, want - len(batch))
                running.held = batch[want:] + running.held  # a blocking read may return 3
                await self.start(batch[:want])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("read loop error (%s); retrying", exc)
                await asyncio.sleep(RETRY_PAUSE)

    async def _read_by_band(self, streams: list[str], want: int) -> list[Delivery]:
        """Highest band first; block on all bands only when all are empty."""
        got: list[Delivery] = []
        name = self.ctx.name
        for stream in streams:
            if len(got) >= want:
                break
            got += await self.ctx.stream.read([stream], name, want - len(got), None)
        if got:
            return got
        return await self.ctx.stream.read(streams, name, 1, READ_BLOCK_MS)

    # -- source 2: entries of dead consumers ------------------------------------------------------

    async def _autoclaim_loop(self) -> None:
        while True:
            try:
                await self.autoclaim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("autoclaim failed: %s", exc)
            await asyncio.sleep(self.autoclaim_every)

    async def autoclaim(self) -> None:
        """Take over entries idle on dead consumers; their lapsed attempts count as failed."""
        ctx = self.ctx
        min_idle_ms = int(ctx.settings.claim_idle_seconds * 1000)
        for queue, partition in ctx.partitions:
            for stream in ctx.keys.partition_streams(queue, partition):
                if ctx.running.free <= 0 or ctx.stopping.is_set():
                    return
                found = await ctx.stream.autoclaim(stream, ctx.name, min_idle_ms, ctx.running.free)
                if found.deleted:
                    await self.maintenance.entries_vanished(queue, stream, len(found.deleted))
                if not found.deliveries:
                    continue
                ids = [d.job_id for d in found.deliveries if d.job_id is not None]
                await self.maintenance.reclaim(ids)
                await self.start(found.deliveries)

    # -- claiming and running ----------------------------------------------------------------------

    async def start(self, deliveries: list[Delivery]) -> None:
        """Claim the deliveries' jobs in one statement and start those we won."""
        if not deliveries:
            return
        ctx = self.ctx
        ids = list({d.job_id for d in deliveries if d.job_id is not None})
        try:
            async with ctx.sessions.begin() as session:
                claimed = await repository.claim_many(session, ids, ctx.name, ctx.lease_seconds)
        except Exception:
            ctx.running.held.extend(deliveries)  # Postgres is down: keep them and try again
            raise
        won = {row.id: row for row in claimed}
        if won and ctx.stopping.is_set():
            await self._release_late(list(won.values()), deliveries)
            return
        dropped: list[Delivery] = []
        for d in deliveries:
            row = won.pop(d.job_id, None) if d.job_id is not None else None
            if row is None:
                dropped.append(d)  # taken, cancelled, finished, or a duplicate entry
                continue
            entry = Running(row, d)
            ctx.running.add(entry)
            entry.task = asyncio.create_task(self._run(entry), name=f"job-{row.id}")
        await ctx.stream.ack(dropped)

    async def _release_late(self, rows: list[JobRow], deliveries: list[Delivery]) -> None:
        """A claim that committed after shutdown began (a loop slow to cancel): hand those
        jobs straight back instead of starting them, so none is left ``running``."""
        ctx = self.ctx
        async with ctx.sessions.begin() as session:
            released = await repository.release_many(
                session, ctx.name, [(r.id, r.attempts) for r in rows]
            )
        await ctx.dispatcher.send_committed(released)
        await ctx.stream.ack(deliveries)
        log.info("handed back %d job(s) claimed during shutdown", len(released))

    async def _run(self, entry: Running) -> None:
        outcome = await execute(entry.job, self.registry, self.ctx.name)
        await self.reporter.put(outcome, entry.delivery)

    # -- handing back on shutdown ------------------------------------------------------------------

    async def hand_back(self) -> None:
        """Release unfinished attempts and unclaimed deliveries so others take them at once."""
        ctx = self.ctx
        unfinished = [r for r in ctx.running if r.task is None or r.task.cancelled()]
        try:
            stray = await self._stray_deliveries()
            async with ctx.sessions.begin() as session:
                released = await repository.release_many(
                    session, ctx.name, [(r.job.id, r.job.attempts) for r in unfinished]
                )
                targets = released + await self._orphan_targets(session, stray)
            await ctx.dispatcher.send_committed(targets)
            await ctx.stream.ack([r.delivery for r in unfinished] + stray)
            if targets:
                log.info("handed back %d job(s)", len(targets))
        except Exception as exc:  # the lease sweep and XAUTOCLAIM recover them instead
            log.warning("could not hand back jobs on shutdown: %s", exc)

    async def _stray_deliveries(self) -> list[Delivery]:
        """Our pending entries that no running job stands for: the held ones, and those a
        read or claim cut short by shutdown left behind (Redis delivered them to us)."""
        ctx = self.ctx
        busy = {(r.delivery.stream, r.delivery.entry_id) for r in ctx.running}
        found: dict[tuple[str, str], Delivery] = {}
        held, ctx.running.held = ctx.running.held, []
        try:
            for queue, partition in ctx.partitions:
                streams = ctx.keys.partition_streams(queue, partition)
                held += await ctx.stream.read_own(streams, ctx.name, STRAY_READ_COUNT)
        except Exception as exc:  # still release what we hold; XAUTOCLAIM takes the rest
            log.warning("could not read our pending entries on shutdown: %s", exc)
        for d in held:
            if (d.stream, d.entry_id) not in busy:
                found[(d.stream, d.entry_id)] = d
        return list(found.values())

    async def _orphan_targets(
        self, session: AsyncSession, deliveries: Sequence[Delivery]
    ) -> list[Target]:
        """Jobs of stray deliveries to send again: queued ones, and ones whose claim committed
        for us without a task being started (released; that attempt does not count)."""
        ctx = self.ctx
        ids = {d.job_id for d in deliveries if d.job_id is not None}
        rows = [r for r in [await queries.get_job(session, i) for i in ids] if r is not None]
        rows = [r for r in rows if r.id not in ctx.running]  # those are handed back already
        claimed = [
            (r.id, r.attempts)
            for r in rows
            if r.status == JobStatus.RUNNING and r.worker == ctx.name
        ]
        released = await repository.release_many(session, ctx.name, claimed)
        queued = [Target(r.id, r.queue, r.priority) for r in rows if r.status == JobStatus.QUEUED]
        # Their entries are deleted next; a full stream may refuse the new ones: sweep them.
        await repository.unmark_dispatched(session, [t.id for t in queued])
        return queued + released
