"""The read side: deliveries in, attempts started.

Two sources deliver entries: one XREADGROUP loop per (queue, partition), highest band first,
and a periodic XAUTOCLAIM of entries idle on dead consumers. Both reserve room under
``--concurrency`` first and hand their deliveries to :meth:`Reader.start`, which claims the
jobs in one guarded statement and runs each attempt won in its own task; the outcome goes to
the reporter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg

from app.flow import claim as flow
from app.jobs import attempts, marks
from app.jobs.attempts import Claim, Completion
from app.jobs.registry import Registry
from app.jobs.repository import Target
from app.jobs.status import JobStatus
from app.observe import tracing
from app.streams import notify
from app.streams.client import Delivery
from workers import telemetry
from workers.cancellation import report
from workers.context import Attempt, Running, WorkerContext
from workers.controls import Controls, Resender
from workers.deadlines import Deadlines
from workers.execution import cancelled, execute, outcome_of
from workers.maintenance import Maintenance
from workers.progress import ProgressWriter
from workers.reporter import Reporter

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Deliveries sorted for one claim."""

    fresh: dict[UUID, Delivery] = field(default_factory=dict)  # to claim, first entry per job
    later: list[Delivery] = field(default_factory=list)  # no room now: held for later
    busy: list[tuple[Delivery, Attempt]] = field(default_factory=list)  # jobs we are running
    dropped: list[Delivery] = field(default_factory=list)  # to ack
    paused: list[Delivery] = field(default_factory=list)  # of a paused queue: hold, then ack


READ_COUNT = 500  # the most entries one read (and one claim statement) takes
READ_BLOCK_MS = 1000
# A turn that started at most this many jobs finds the queue quiet: the next read is the
# blocking one at once (see _read_loop).
QUIET_BATCH = 2
RETRY_PAUSE = 1.0
STRAY_READ_COUNT = 1000
SETTLE_SECONDS = 10.0


class Reader:
    def __init__(
        self,
        ctx: WorkerContext,
        registry: Registry,
        reporter: Reporter,
        maintenance: Maintenance,
        progress: ProgressWriter,
        controls: Controls,
    ) -> None:
        self.ctx = ctx
        self.controls = controls  # paused queues and limits, refreshed every poll interval
        self.resender = Resender(ctx.dispatcher, ctx.settings.dispatch_grace_seconds)
        self.queue_of = {s: q for q, p in ctx.partitions for s in ctx.keys.partition_streams(q, p)}
        self.registry = registry
        self.reporter = reporter
        self.progress = progress
        self.maintenance = maintenance  # fails lapsed attempts, repairs vanished entries
        idle = ctx.settings.claim_idle_seconds
        self.autoclaim_every = max(0.2, min(idle / 2, 10.0))
        self._claims: set[asyncio.Future[notify.Announcement | None]] = set()
        self.deadlines = Deadlines()  # the attempts' time limits, armed when they draw near

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        loops = [self._read_loop(q, p) for q, p in self.ctx.partitions]
        return [*loops, self._autoclaim_loop(), self.resender.run()]

    # -- source 1: new entries ----------------------------------------------------------------

    async def _read_loop(self, queue: str, partition: int) -> None:
        streams = self.ctx.keys.partition_streams(queue, partition)
        running = self.ctx.running
        controls = self.controls
        interval = self.ctx.settings.promote_interval_seconds
        woke = False  # the blocking read just returned entries: start them before reading more
        quiet = False  # the last turn started few jobs: skip the non-blocking band reads
        # The last claim's job-change message, when it had no ack to ride with: it goes with
        # this loop's next read, which follows at once unless there is no room (or the queue
        # is paused, or held entries wait): then it goes on its own first.
        outbox: notify.Announcement | None = None
        # Not ``while True``: redis-py can swallow the cancellation of a blocking XREADGROUP,
        # and the loop must still end with the worker.
        while not self.ctx.stopping.is_set():
            if queue in controls.paused:  # entries wait in the stream, unread
                await self._send(outbox)
                outbox = None
                await controls.until_changed(interval)
                continue
            if running.free <= 0:  # reserve() waits for room
                await self._send(outbox)
                outbox = None
            slots = await running.reserve(READ_COUNT)
            batch: list[Delivery] = []  # ours until start() takes it
            try:
                batch = running.take_held(slots)
                # With entries in hand: after an idle wait, the entry that ended it is
                # claimed at once (reading every band first would put a round trip per band
                # before the first job of a quiet queue; what came meanwhile is read on the
                # next turn). With none, on a quiet queue (the last turn started a job or two
                # and had room for more) the blocking read below comes at once: it returns
                # when any band holds an entry, so a lone job costs one read, not four. Under
                # load the band reads come back: their round trips let entries gather into
                # bigger claims.
                read_bands = (len(batch) < slots and not woke) if batch else not quiet
                announce, outbox = outbox, None
                if read_bands:
                    await self._read_by_band(streams, slots, batch, announce)
                    announce = None
                elif batch:
                    await self._send(announce)
                    announce = None
                woke = False
                if batch:
                    # Quiet: the bands ran dry before the room did. A turn cut short by the
                    # room (a busy worker whose attempts end one by one) is not.
                    quiet = len(batch) <= QUIET_BATCH and len(batch) < slots
                    taken, batch = batch, []
                    outbox = await self.start(taken, slots, defer_message=True)
                    continue
                quiet = True
                running.unreserve(slots)
                slots = 0
                # Nothing anywhere: wait for an entry without holding room (it is held, and
                # pending for us, until room frees up). Not ``held += await ...``: that reads
                # the list before the wait and stores it back after, so it would put back the
                # list the other loops took from meanwhile and drop what they added.
                # The count is per band: a few entries of each, at most the room free now
                # (more than that would wait here, unread by the other workers).
                count = max(1, min(running.free, READ_COUNT) // len(streams))
                name = self.ctx.name
                found = await self.ctx.stream.read(streams, name, count, READ_BLOCK_MS, announce)
                running.held.extend(found)
                woke = bool(found)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # What was taken from ``held`` or read before the error is held again, not
                # left pending on us until XAUTOCLAIM finds it idle.
                running.held.extend(batch)
                log.warning("read loop error (%s); retrying", exc)
                await asyncio.sleep(RETRY_PAUSE)
            finally:
                running.unreserve(slots)
        await self._send(outbox)

    async def _send(self, message: notify.Announcement | None) -> None:
        """A job-change message on its own (never raises)."""
        if message is not None:
            await notify.send(self.ctx.stream.redis, message)

    async def _read_by_band(
        self,
        streams: list[str],
        want: int,
        into: list[Delivery],
        announce: notify.Announcement | None = None,
    ) -> None:
        """Highest band first, without blocking, until ``into`` holds ``want`` deliveries
        (appended as each read returns, so an error in a later read loses none). ``announce``
        goes with the first read."""
        name = self.ctx.name
        for stream in streams:
            if len(into) >= want:
                break
            into += await self.ctx.stream.read([stream], name, want - len(into), None, announce)
            announce = None
        await self._send(announce)

    # -- source 2: entries of dead consumers ------------------------------------------------------

    async def _autoclaim_loop(self) -> None:
        while not self.ctx.stopping.is_set():
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
            if queue in self.controls.paused:
                continue
            for stream in ctx.keys.partition_streams(queue, partition):
                if ctx.stopping.is_set():
                    return
                slots = ctx.running.reserve_now(READ_COUNT)
                if not slots:
                    return
                try:
                    found = await ctx.stream.autoclaim(stream, ctx.name, min_idle_ms, slots)
                    if found.deleted:
                        await self.maintenance.entries_vanished(queue, stream, len(found.deleted))
                    if found.deliveries:
                        ids = [d.job_id for d in found.deliveries if d.job_id is not None]
                        await self.maintenance.reclaim(ids)
                        await self.start(found.deliveries, slots)
                finally:
                    ctx.running.unreserve(slots)

    # -- claiming and running ----------------------------------------------------------------------

    async def start(
        self, deliveries: list[Delivery], slots: int, *, defer_message: bool = False
    ) -> notify.Announcement | None:
        """Claim the deliveries' jobs in one statement and start those we won, at most
        ``slots`` (reserved by the caller). A job this worker is running is never claimed
        again here (see :meth:`_sort_busy`).

        ``defer_message``: when the claims' job-change message has no ack to ride with, it
        is returned for the caller's next read to carry, instead of sent on its own."""
        running = self.ctx.running
        paused = self.controls.paused
        batch = Batch()
        for d in deliveries:
            if d.job_id is None or d.job_id in batch.fresh:
                batch.dropped.append(d)  # unreadable, or a duplicate entry of this batch
            elif (current := running.get(d.job_id)) is not None:
                if current.delivery != d:  # our own entry (XAUTOCLAIM) needs nothing
                    batch.busy.append((d, current.attempt))
            elif paused and self.queue_of.get(d.stream) in paused:
                batch.paused.append(d)
            elif len(batch.fresh) < slots:
                batch.fresh[d.job_id] = d
            else:
                batch.later.append(d)
        # A claim commits on its own once sent: if our caller is cancelled (shutdown) while
        # it runs, it still finishes, and its jobs are started or handed straight back.
        claim = asyncio.ensure_future(self._claim_and_start(batch, defer_message))
        self._claims.add(claim)
        claim.add_done_callback(self._claims.discard)
        return await asyncio.shield(claim)

    async def settle(self) -> None:
        """Wait for claims in flight (after the loops were cancelled)."""
        if self._claims:
            await asyncio.wait(list(self._claims), timeout=SETTLE_SECONDS)

    async def _claim_and_start(
        self, batch: Batch, defer_message: bool
    ) -> notify.Announcement | None:
        ctx = self.ctx
        running = ctx.running
        fresh = batch.fresh
        try:
            async with ctx.db.acquire() as conn:
                claimed = await self._claim(conn, list(fresh))
                await self._sort_busy(conn, batch)
                if batch.paused:  # the sweep sends them again; nobody reads them meanwhile
                    await flow.hold(conn, [d.job_id for d in batch.paused if d.job_id])
                    batch.dropped.extend(batch.paused)
        except Exception:
            running.held.extend([*fresh.values(), *batch.later, *(d for d, _ in batch.busy)])
            running.held.extend(batch.paused)
            raise
        running.held.extend(batch.later)
        if claimed and ctx.stopping.is_set():
            await self._release_late(claimed, [*fresh.values(), *batch.dropped])
            return None
        telemetry.started(claimed, fresh, ctx.name)
        for job in claimed:
            entry = Running(job, fresh.pop(job.id))
            running.add(entry)
            entry.task = asyncio.create_task(self._run(entry))
        # The rest were taken, cancelled or finished: their entries are done with. The
        # message of the claims (it wakes SSE followers) goes in the same round trip, or,
        # with nothing to ack, in the caller's next read.
        claims = ctx.changes.announcement((), [job.id for job in claimed])
        done_with = [*fresh.values(), *batch.dropped]
        if defer_message and not done_with and not ctx.stopping.is_set():
            return claims
        await ctx.stream.ack(done_with, claims)
        return None

    async def _claim(self, conn: asyncpg.Connection, ids: list[UUID]) -> list[Claim]:
        """The plain claim, or, while some limit is in force, the claim under limits; the
        jobs a limit holds back are sent again later (their entries are acked with the rest
        of the unclaimed)."""
        ctx = self.ctx
        if not self.controls.limits:
            return await attempts.claim_many(conn, ids, ctx.name, ctx.lease_seconds)
        claimed, held = await flow.claim_limited(
            conn,
            ids,
            ctx.name,
            ctx.lease_seconds,
            self.controls.limits,
            retry_seconds=ctx.settings.promote_interval_seconds,
            dispatch_grace=ctx.settings.dispatch_grace_seconds,
        )
        self.resender.later(held)
        return claimed

    async def _sort_busy(self, conn: asyncpg.Connection, batch: Batch) -> None:
        """Deliveries of jobs we are running: a duplicate entry of the attempt we run is
        dropped; any other (the job was reclaimed and queued again while our attempt, now
        stale, still runs) waits in ``held`` until our attempt ends, so the job never runs
        twice here at once."""
        if not batch.busy:
            return
        ids = [d.job_id for d, _ in batch.busy if d.job_id is not None]
        now = {
            (s.id, s.token)
            for s in await attempts.states(conn, ids)
            if s.status == JobStatus.RUNNING
        }
        for d, attempt in batch.busy:
            (batch.dropped if attempt in now else batch.later).append(d)

    async def _release_late(self, claimed: list[Claim], deliveries: list[Delivery]) -> None:
        """A claim that committed after shutdown began (a loop slow to cancel): hand those
        jobs straight back instead of starting them, so none is left ``running``."""
        ctx = self.ctx
        async with ctx.db.acquire() as conn:
            released = await attempts.release_many(
                conn, ctx.name, [(c.id, c.token) for c in claimed]
            )
        await ctx.dispatcher.send_committed(released)
        await ctx.stream.ack(deliveries)
        log.info("handed back %d job(s) claimed during shutdown", len(released))

    async def _run(self, entry: Running) -> None:
        job = entry.job
        with tracing.attempt(
            job.id, job.type, job.queue, job.attempt, self.ctx.name, job.traceparent
        ) as span:
            completion = await self._execute(entry)
            if span is not tracing.OFF:
                span.outcome(*outcome_of(completion))
        report(self.reporter, entry, completion)

    async def _execute(self, entry: Running) -> Completion:
        try:
            completion = await execute(
                entry.job,
                self.registry,
                self.ctx.name,
                default_timeout=self.ctx.settings.default_timeout_seconds,
                cancel=entry.cancel,
                progress=self.progress.sink(entry.attempt),
                deadlines=self.deadlines,
            )
        except asyncio.CancelledError:
            self.progress.discard(entry.attempt)
            if not entry.cancel.is_set():
                raise  # shutdown: the attempt is handed back
            return cancelled(entry.job)
        self.progress.discard(entry.attempt)
        if entry.cancel.is_set():
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                return cancelled(entry.job)  # it caught the cancellation and returned
        return completion

    # -- handing back on shutdown ------------------------------------------------------------------

    async def hand_back(self) -> None:
        """Release unfinished attempts and unclaimed deliveries so others take them at once."""
        ctx = self.ctx
        # not started, cancelled, or still running after the cancel (it ignored it: abandoned)
        unfinished = [
            r for r in ctx.running if r.task is None or not r.task.done() or r.task.cancelled()
        ]
        try:
            stray = await self._stray_deliveries()
            async with ctx.db.acquire() as conn:
                released = await attempts.release_many(
                    conn, ctx.name, [r.attempt for r in unfinished]
                )
                targets = released + await self._orphan_targets(conn, stray)
            telemetry.handed_back([r.job for r in unfinished], {t.id for t in released}, ctx.name)
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
        self, conn: asyncpg.Connection, deliveries: Sequence[Delivery]
    ) -> list[Target]:
        """Jobs of stray deliveries to send again: queued ones, and ones whose claim committed
        for us without a task being started (released; that attempt does not count)."""
        ctx = self.ctx
        ids = {d.job_id for d in deliveries if d.job_id is not None} - {
            r.job.id
            for r in ctx.running  # those are handed back already
        }
        states = await attempts.states(conn, list(ids))
        claimed = [
            (s.id, s.token)
            for s in states
            if s.status == JobStatus.RUNNING and s.worker == ctx.name
        ]
        released = await attempts.release_many(conn, ctx.name, claimed)
        queued = [Target(s.id, s.queue, s.priority) for s in states if s.status == JobStatus.QUEUED]
        # Their entries are deleted next; a full stream may refuse the new ones: sweep them.
        async with ctx.sessions.begin() as session:
            await marks.unmark_dispatched(session, [t.id for t in queued])
        return queued + released
