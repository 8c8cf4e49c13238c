"""Sending queued jobs to their streams, and confirming that they were sent.

Postgres commits first; then the entry is XADDed; then ``dispatched_at`` is set. A crash between
any two steps leaves ``dispatched_at`` NULL, and the dispatcher sweep sends the job again after a
grace period. Two entries for one job are harmless: only one claim can move it to ``running``.
A confirmation only marks a job still in the ``queued`` turn that the XADD was for (queued no
later than the XADD), and only if no loss of Redis data was detected since the XADD: a late
one must not hide a job that ran and was queued again since, or whose entry Redis lost after
the loss's re-dispatch had run.

The API confirms in the background, 50 ms after its XADDs, and skips every job that a
job-change message (:mod:`app.streams.notify`) has named since: a claimed or finished job is
no longer in the ``queued`` turn its XADD was for, so its confirmation would change nothing.
Skipping one is always safe: a job left unmarked is at worst sent again by the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.jobs import marks
from app.jobs.marks import Sent
from app.jobs.repository import Target
from app.streams.client import StreamClient
from app.streams.keys import band_for, partition_for
from app.streams.notify import Change

log = logging.getLogger(__name__)

_Unconfirmed = tuple[UUID, float, str]  # (job, monotonic time of its XADD, its entry id)
_Sent = tuple[float, str]  # (monotonic time of a job's XADD, its entry id)


class Dispatcher:
    def __init__(
        self,
        stream: StreamClient,
        sessions: async_sessionmaker[AsyncSession],
        partitions: int,
        *,
        confirm_interval: float = 0.05,
    ) -> None:
        self.stream = stream
        self.sessions = sessions
        self.partitions = partitions
        self.confirm_interval = confirm_interval
        self._unconfirmed: dict[UUID, _Sent] = {}
        self.skipped = 0  # confirmations not needed: the job changed before its turn came
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def stream_of(self, target: Target) -> str:
        return self.stream.keys.stream(
            target.queue, partition_for(target.id, self.partitions), band_for(target.priority)
        )

    async def send(self, targets: Sequence[Target]) -> dict[UUID, str]:
        """XADD the entries; returns the entry id of each job sent (those over the stream
        bound wait)."""
        if not targets:
            return {}
        traced = {t.id: t.traceparent for t in targets if t.traceparent}
        return await self.stream.dispatch(
            [(self.stream_of(t), t.id) for t in targets], traced or None
        )

    async def send_and_confirm(self, session: AsyncSession, targets: Sequence[Target]) -> set[UUID]:
        """Send jobs that were already ``queued`` when the caller's transaction began (and that
        it holds locked), then mark them in that transaction. Returns the ids sent."""
        began = time.monotonic()
        sent = await self.send(targets)
        await self._confirm(session, [(job_id, began, e) for job_id, e in sent.items()])
        return set(sent)

    async def send_committed(self, targets: Sequence[Target]) -> int:
        """Send jobs whose move to ``queued`` is committed, then confirm in a new transaction.

        The commit must come first: a worker that reads the entry before the commit would
        find the job not yet queued and drop the delivery.
        """
        began = time.monotonic()
        sent = await self.send(targets)
        if sent:
            async with self.sessions.begin() as session:
                await self._confirm(session, [(job_id, began, e) for job_id, e in sent.items()])
        return len(sent)

    async def send_after_commit(self, targets: Sequence[Target]) -> None:
        """For the API: send now, confirm in the background in batches. Never raises."""
        began = time.monotonic()
        try:
            sent = await self.send(targets)
        except Exception as exc:  # Redis is down: the dispatcher sweep sends them later.
            log.warning("dispatch deferred: %s (%d jobs)", type(exc).__name__, len(targets))
            return
        if sent:
            self._unconfirmed.update((job_id, (began, e)) for job_id, e in sent.items())
            self._wake.set()

    def changed(self, change: Change) -> None:
        """Jobs named by a job-change message (claimed, finished, ...) need no confirmation:
        they have left the ``queued`` turn of their XADD, if they were ever in it."""
        unconfirmed = self._unconfirmed
        if unconfirmed:
            for ids in (change.changed, change.terminal):
                for job_id in ids:
                    if unconfirmed.pop(job_id, None) is not None:
                        self.skipped += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._confirm_loop(), name="dispatch-confirm")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush()

    async def _confirm_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.confirm_interval)
            try:
                await self._flush()
            except Exception as exc:  # Postgres is down: the sweep re-sends; duplicates are safe.
                log.warning("dispatch confirmation failed: %s", type(exc).__name__)

    async def _flush(self) -> None:
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        if not unconfirmed:
            return
        sent = [(job_id, at, entry) for job_id, (at, entry) in unconfirmed.items()]
        async with self.sessions.begin() as session:
            await self._confirm(session, sent)

    async def _confirm(self, session: AsyncSession, sent: Sequence[_Unconfirmed]) -> None:
        """Mark ``(job, monotonic time of its XADD, entry id)`` as dispatched, where valid."""
        now = time.monotonic()
        await marks.confirm_dispatched(
            session, [Sent(job_id, now - at, e) for job_id, at, e in sent], self.stream.keys.prefix
        )
