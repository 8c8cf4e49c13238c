"""Background duties of every worker: heartbeat, promote, dispatch sweep, reclaim, reconcile.

Each is safe to run in many workers at once (guarded statements, SKIP LOCKED), logs its
errors and goes on. Postgres decides; Redis is only told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from app.db.models import JobRow
from app.jobs import repository, workers_table
from workers import shutdown

if TYPE_CHECKING:
    from workers.runner import Worker

log = logging.getLogger(__name__)

DISPATCH_BATCH = 1000
RECLAIM_BATCH = 500
WORKER_ROW_TTL_SECONDS = 3600


class Maintenance:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        idle = worker.settings.claim_idle_seconds
        self.heartbeat_every = max(0.1, min(idle / 3, 5.0))
        self.autoclaim_every = max(0.2, min(idle / 2, 10.0))
        self.leased: set[UUID] = set()  # jobs whose leases the last heartbeat extended
        self.token: datetime | None = None  # our claim on our name (workers_table)

    def lease_loops(self) -> list[Coroutine[Any, Any, None]]:
        """Heartbeat and entry refresh: they run until the worker has handed back its jobs,
        so that jobs finishing during the grace period are not reclaimed meanwhile."""
        return [
            self._every(self.heartbeat_every, self.heartbeat),
            self._every(self.heartbeat_every, self.refresh_entries),
        ]

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The other duties: they stop as soon as the worker stops."""
        s = self.w.settings
        return [
            self._every(s.promote_interval_seconds, self.promote_and_dispatch),
            self._every(self.autoclaim_every, self.autoclaim),
            self._reconcile_loop(),
        ]

    async def _every(self, seconds: float, duty: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await duty()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s failed: %s", duty.__name__, exc)
            await asyncio.sleep(seconds)

    # -- registration and heartbeat --------------------------------------------------------------

    def _worker_values(self) -> dict[str, Any]:
        return {
            "name": self.w.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.w.config.queues,
            "concurrency": self.w.config.concurrency,
            "in_flight": len(self.w.running),
        }

    async def register(self) -> None:
        """Claim our name (raises ``NameInUse`` if a live worker holds it)."""
        self.token = await workers_table.claim_name(
            self.w.sessions, self._worker_values(), self.w.lease_seconds
        )

    async def unregister(self) -> None:
        try:
            async with self.w.sessions.begin() as session:
                if self.token is not None:
                    await workers_table.release_name(session, self.w.name, self.token)
            for stream in self.w.all_streams:
                mine = [
                    c for c in await self.w.stream.consumers(stream) if c["name"] == self.w.name
                ]
                if mine and mine[0]["pending"] == 0:
                    await self.w.stream.delete_consumer(stream, self.w.name)
        except Exception as exc:
            log.warning("could not unregister: %s", exc)

    async def heartbeat(self) -> None:
        """Extend our leases in Postgres. A loop of its own: a slow or hung Redis must never
        delay a lease extension past the lease."""
        running = list(self.w.running.values())
        async with self.w.sessions.begin() as session:
            self.leased = await repository.extend_leases(
                session,
                self.w.name,
                [(r.job.id, r.job.attempts) for r in running],
                self.w.lease_seconds,
            )
            if self.token is not None and not await workers_table.beat(
                session, self._worker_values(), self.token
            ):
                shutdown.displaced(self.w.name)

    async def refresh_entries(self) -> None:
        """Reset the idle time of our pending entries in Redis, so XAUTOCLAIM leaves them.

        Only attempts we still hold (at the last heartbeat) are refreshed: after a reclaim,
        XCLAIM would take the entry back from the worker that runs the newer attempt.
        """
        mine = [r.delivery for r in self.w.running.values() if r.job.id in self.leased]
        await self.w.stream.refresh(self.w.name, mine + self.w.held)

    # -- promotion and dispatch -------------------------------------------------------------------

    async def promote_and_dispatch(self) -> None:
        """Due scheduled/retrying jobs → queued → their streams; then unconfirmed ones again."""
        while True:
            async with self.w.sessions.begin() as session:
                targets = await repository.promote_due(
                    session, self.w.config.queues, DISPATCH_BATCH
                )
            await self.w.dispatcher.send_committed(targets)
            if len(targets) < DISPATCH_BATCH:
                break
        await self.sweep_undispatched(self.w.settings.dispatch_grace_seconds)

    async def sweep_undispatched(self, grace: float) -> int:
        total = 0
        while True:
            async with self.w.sessions.begin() as session:
                targets = await repository.lock_undispatched(
                    session, self.w.config.queues, grace, DISPATCH_BATCH
                )
                sent = await self.w.dispatcher.send_and_confirm(session, targets)
            total += sent
            if len(targets) < DISPATCH_BATCH or sent == 0:
                break
        if total:
            log.info("dispatched %d job(s) whose stream entries were missing", total)
        return total

    # -- reclaim ------------------------------------------------------------------------------

    async def autoclaim(self) -> None:
        """Take over entries idle on dead consumers; their lapsed attempts count as failed."""
        min_idle_ms = int(self.w.settings.claim_idle_seconds * 1000)
        for queue, partition in self.w.partitions:
            for stream in self.w.keys.partition_streams(queue, partition):
                if self.w.free <= 0 or self.w.stopping.is_set():
                    return
                found = await self.w.stream.autoclaim(stream, self.w.name, min_idle_ms, self.w.free)
                if found.deleted:
                    await self.entries_vanished(queue, stream, len(found.deleted))
                if not found.deliveries:
                    continue
                ids = [d.job_id for d in found.deliveries if d.job_id is not None]
                await self.reclaim(ids)
                await self.w.start(found.deliveries)

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
        async with self.w.sessions.begin() as session:
            await repository.forget_dispatches(session, [queue])
        await self.sweep_undispatched(0.0)

    async def reclaim(self, ids: Sequence[Any] | None) -> int:
        """Fail the attempts whose lease lapsed (``worker lost``): retry, or dead at the cap."""
        total = 0
        while True:
            async with self.w.sessions.begin() as session:
                rows = await repository.reclaim_expired(
                    session,
                    self.w.name,
                    self.w.backoff,
                    self.w.config.queues,
                    ids=ids,
                    limit=RECLAIM_BATCH,
                )
            total += len(rows)
            for row in rows:
                log.info(
                    "reclaimed job from a lost worker",
                    extra={"job_id": str(row.id), "status": row.status},
                )
            await self.dead_lettered([r for r in rows if r.status == "dead"])
            if ids is not None or len(rows) < RECLAIM_BATCH:
                return total

    async def dead_lettered(self, rows: Sequence[JobRow]) -> None:
        """Tell ``<prefix>:dlq`` (a notification: the DLQ of record is the ``dead`` status)."""
        for row in rows:
            try:
                await self.w.stream.add_dead_letter(
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

    # -- reconcile ----------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconcile failed: %s", exc)
            loss = self.w.stream.data_loss
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and this loop then outlived the shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.w.settings.reconcile_seconds):
                    await loss.wait()

    async def reconcile(self) -> None:
        """Compare Postgres with Redis and repair what Redis lost."""
        self.w.stream.data_loss.clear()
        partitions = self.w.partitions
        epochs = await self.w.stream.epochs(partitions)
        forgotten = 0
        async with self.w.sessions.begin() as session:
            lost = {
                queue
                for (queue, partition), epoch in zip(partitions, epochs, strict=True)
                if await repository.record_epoch(
                    session, repository.epoch_key(self.w.keys.prefix, queue, partition), epoch
                )
            }
            if lost:
                forgotten = await repository.forget_dispatches(session, sorted(lost))
        if lost:
            log.warning(
                "Redis data epoch changed for queue(s) %s (first start, restart or data loss):"
                " re-dispatching %d queued job(s)",
                ",".join(sorted(lost)),
                forgotten,
            )
            await self.w.stream.ensure_groups(self.w.all_streams, force=True)
            await self.sweep_undispatched(0.0)
        await self.reclaim(None)
        await self._prune()

    async def _prune(self) -> None:
        """Forget long-gone workers; delete their consumers only once nothing is pending."""
        async with self.w.sessions.begin() as session:
            gone = await workers_table.stale_workers(session, WORKER_ROW_TTL_SECONDS)
            await workers_table.remove_workers(session, gone)
        idle_ms = WORKER_ROW_TTL_SECONDS * 1000
        for stream in self.w.all_streams:
            for consumer in await self.w.stream.consumers(stream):
                if consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                    await self.w.stream.delete_consumer(stream, consumer["name"])
