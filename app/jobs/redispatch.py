"""Getting every queued job of a worker's queues into its stream, and back in after a loss.

Four duties, run by every worker for its own queues (safe in parallel: rows are locked with
SKIP LOCKED before they are sent, and a duplicate entry is dropped by the guarded claim):

- **promote**: due scheduled and retrying jobs become ``queued`` and are sent.
- **sweep**: queued jobs without a dispatch mark (their XADD failed, did not fit under the
  stream bound, or was never confirmed) are sent, per queue and priority band, oldest first,
  only to streams that have room, so a full stream never holds back the others.
- **repair**: when Redis may have lost entries (a new data epoch, or a consumer group found
  missing: the stream was deleted, evicted or lost) the queue's marks are forgotten in the
  same transaction as a loss record, and the sweep re-sends them all.
- **failover**: when the record moved to another PostgreSQL server (a promoted replica, a
  restore: ``app.jobs.failover``), every queued job's mark is forgotten and the sweep re-sends.
- **entry check**: the backstop for any loss nothing else noticed. A queued job whose mark is
  older than ``CONVEYOR_DISPATCH_CHECK_SECONDS`` has its recorded stream entry looked up
  (``XRANGE id id``, O(log n)); if the entry is gone it is sent again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.jobs import failover, marks, repository
from app.jobs.dispatch import Dispatcher
from app.jobs.marks import Marked
from app.settings import Settings
from app.streams.client import StreamClient
from app.streams.keys import band_for, partition_for
from app.streams.notify import Publisher

log = logging.getLogger(__name__)

PROMOTE_BATCH = 1000
SWEEP_PAGE = 1000  # undispatched jobs read per query
SWEEP_PAGES = 10  # per queue and band and round: bounds a round's work behind full streams
CHECK_PAGE = 1000  # queued jobs looked at per queue and entry check


class Redispatcher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        stream: StreamClient,
        dispatcher: Dispatcher,
        queues: Sequence[str],
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.stream = stream
        self.dispatcher = dispatcher
        self.queues = list(queues)
        self.settings = settings
        self.keys = stream.keys
        self.partition_count = settings.partitions
        self.partitions = [(q, p) for q in self.queues for p in range(settings.partitions)]
        self.streams = {
            s: (q, p) for q, p in self.partitions for s in self.keys.partition_streams(q, p)
        }
        self._checked_to: dict[str, Marked] = {}  # the entry check's place per queue
        self.changes = Publisher(stream.redis, stream.keys.changes)
        # A job is swept only once unconfirmed for the grace G, so looking four times per G
        # (not at every promotion poll) finds it within G/4 of that, at a fraction of the
        # statements an idle worker makes.
        self.sweep_every = max(
            settings.promote_interval_seconds, settings.dispatch_grace_seconds / 4
        )
        self._swept_at = -math.inf  # time.monotonic() of the last periodic sweep

    def _stream(self, queue: str, job_id: UUID, band: int) -> str:
        return self.keys.stream(queue, partition_for(job_id, self.partition_count), band)

    # -- promote and sweep ------------------------------------------------------------------------

    async def promote_and_sweep(self, *, promote: bool = True) -> None:
        """Due scheduled/retrying jobs → queued → their streams; then, every ``sweep_every``
        seconds, the unconfirmed ones again. ``promote=False``: the caller found nothing due
        (:func:`app.jobs.repository.due_work`), so only the sweep's turn is checked."""
        while promote:
            async with self.sessions.begin() as session:
                targets = await repository.promote_due(session, self.queues, PROMOTE_BATCH)
            await self.dispatcher.send_committed(targets)
            await self.changes.publish((), [t.id for t in targets])  # wakes SSE followers
            if len(targets) < PROMOTE_BATCH:
                break
        now = time.monotonic()
        if now - self._swept_at >= self.sweep_every:
            self._swept_at = now
            await self.sweep(self.settings.dispatch_grace_seconds)

    async def sweep(self, grace: float) -> int:
        """Send queued jobs unconfirmed for ``grace`` seconds to every stream that has room.

        Idle, it costs one statement (three index probes per queue) and no Redis call."""
        async with self.sessions() as session:
            bands = await marks.undispatched_bands(session, self.queues, grace)
        if not bands:
            return 0
        room = await self.stream.room(
            [self.keys.stream(q, p, b) for q, b in bands for p in range(self.partition_count)]
        )
        total = 0
        for queue, band in sorted(bands, key=lambda qb: qb[1]):  # the high band first
            total += await self._sweep_band(queue, band, grace, room)
        if total:
            log.info("dispatched %d job(s) whose stream entries were missing", total)
        return total

    async def _sweep_band(self, queue: str, band: int, grace: float, room: dict[str, int]) -> int:
        """Page through one band's undispatched jobs, oldest first, sending those whose
        stream has room; rows bound for full streams are read, never locked."""
        own = [self.keys.stream(queue, p, band) for p in range(self.partition_count)]
        after = marks.FIRST
        sent = 0
        for _ in range(SWEEP_PAGES):
            if not any(room[s] > 0 for s in own):
                break
            async with self.sessions() as session:
                page = await marks.undispatched_page(session, queue, band, grace, after, SWEEP_PAGE)
            if not page:
                break
            after = page[-1]
            pick: list[UUID] = []
            for job in page:
                stream = self._stream(queue, job.id, band)
                if room[stream] > 0:
                    room[stream] -= 1
                    pick.append(job.id)
            if pick:
                sent += await self._send_locked(queue, band, pick, room)
            if len(page) < SWEEP_PAGE:
                break
        return sent

    async def _send_locked(
        self, queue: str, band: int, ids: list[UUID], room: dict[str, int]
    ) -> int:
        async with self.sessions.begin() as session:
            targets = await marks.lock_undispatched(session, ids)
            sent = await self.dispatcher.send_and_confirm(session, targets)
        for target in targets:
            if target.id not in sent:  # its stream filled up meanwhile
                room[self._stream(queue, target.id, band)] = 0
        return len(sent)

    # -- repair after a loss ----------------------------------------------------------------------

    async def follow_postgres(self) -> None:
        """Compare the PostgreSQL server's identity with the recorded one; after a switch
        (failover, promotion, restore) re-send every queued job."""
        async with self.sessions() as session:  # a failed read leaves nothing to commit
            identity = await failover.server_identity(session)
        if identity is None:
            return
        async with self.sessions.begin() as session:
            switch = await failover.record_identity(session, identity)
        if switch is not None:
            log.warning(
                "PostgreSQL server changed (%s -> %s: failover, promotion or restore; commits"
                " the old server had not replicated are gone): re-dispatching %d queued job(s)",
                switch.before,
                switch.after,
                switch.forgotten,
            )
            await self.sweep(0.0)

    async def repair(self) -> None:
        """Recreate missing consumer groups, compare the data epochs with Postgres, and re-send
        every queued job of a queue that lost entries; re-send all after a Postgres switch."""
        await self.follow_postgres()
        await self.stream.ensure_groups(self.streams, force=True)
        missing = set(self.stream.lost)
        epochs = await self.stream.epochs(self.partitions)
        prefix = self.keys.prefix
        async with self.sessions.begin() as session:
            changed = {
                queue
                for (queue, partition), epoch in zip(self.partitions, epochs, strict=True)
                if await marks.record_epoch(
                    session, marks.epoch_key(prefix, queue, partition), epoch
                )
            }
            gone = {self.streams[s] for s in missing if s in self.streams}
            await marks.record_loss(session, [marks.epoch_key(prefix, q, p) for q, p in gone])
            lost = sorted(changed | {q for q, _ in gone})
            forgotten = await marks.forget_dispatches(session, lost) if lost else 0
        self.stream.settle_lost(missing)
        if lost:
            log.warning(
                "Redis data epoch changed or consumer groups missing for queue(s) %s (first"
                " start, restart, stream deleted or data loss): re-dispatching %d queued job(s)",
                ",".join(lost),
                forgotten,
            )
            await self.sweep(0.0)

    async def entries_vanished(self, queue: str, stream: str, count: int) -> None:
        """Pending entries were deleted from the stream: which jobs they stood for is gone
        with them, so every queued job of the queue is sent again (duplicates are harmless;
        jobs running or done are not touched)."""
        log.warning(
            "%d pending entries no longer existed in %s; re-dispatching queue %s",
            count,
            stream,
            queue,
        )
        _, partition = self.streams.get(stream, (queue, 0))
        async with self.sessions.begin() as session:
            await marks.record_loss(session, [marks.epoch_key(self.keys.prefix, queue, partition)])
            await marks.forget_dispatches(session, [queue])
        await self.sweep(0.0)

    # -- the entry check (backstop) --------------------------------------------------------------

    async def check_entries(self) -> int:
        """Send again the queued jobs whose dispatch mark is older than the check age and
        whose recorded stream entry no longer exists. Each call looks at the next
        ``CHECK_PAGE`` queued jobs of each queue, so a deep backlog is covered over rounds."""
        return sum([await self._check_queue(queue) for queue in self.queues])

    async def _check_queue(self, queue: str) -> int:
        async with self.sessions() as session:
            page = await marks.queued_page(
                session,
                queue,
                self.settings.dispatch_check_seconds,
                self._checked_to.get(queue, marks.LATEST),
                CHECK_PAGE,
            )
        self._checked_to[queue] = page[-1] if len(page) == CHECK_PAGE else marks.LATEST
        old = [m for m in page if m.old]
        found = await self.stream.entries_exist(
            [(self._stream(queue, m.id, band_for(m.priority)), m.entry or "0-0") for m in old]
        )
        lost = [m for m, exists in zip(old, found, strict=True) if not exists]
        if not lost:
            return 0
        async with self.sessions.begin() as session:
            targets = await marks.unmark_lost(session, lost)
            sent = await self.dispatcher.send_and_confirm(session, targets)
        if targets:  # those that did not fit under the stream bound are left to the sweep
            log.warning(
                "%d queued job(s) of queue %s had lost their stream entries; sending them again",
                len(targets),
                queue,
            )
        return len(sent)
