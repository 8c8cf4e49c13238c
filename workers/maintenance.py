"""Background duties of every worker: heartbeat, promote, dispatch sweep, reclaim, reconcile,
retention (pruning finished jobs) and completion callbacks.

Each is safe to run in many workers at once (guarded statements, SKIP LOCKED), logs its
errors and goes on. Postgres decides; Redis is only told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from app.jobs import attempts, repository, retention, workers_table
from app.jobs.attempts import Dead
from app.jobs.redispatch import Redispatcher
from app.jobs.registry import load_handlers
from app.jobs.status import JobStatus
from app.schedules.due import ScheduleDuty
from workers import shutdown, telemetry
from workers.callbacks import CallbackDuty
from workers.cancellation import Canceller
from workers.context import Attempt, WorkerContext
from workers.reporter import Reporter

log = logging.getLogger(__name__)

RECLAIM_BATCH = 500
PRUNE_EVERY_SECONDS = 1.0  # a pass that ran out of its budget comes back at once
CALLBACK_EVERY_SECONDS = 0.5
WORKER_ROW_TTL_SECONDS = 3600


class Maintenance:
    def __init__(self, ctx: WorkerContext, reporter: Reporter) -> None:
        self.ctx = ctx
        self.reporter = reporter  # tells the DLQ stream of jobs that a reclaim made dead
        idle = ctx.settings.claim_idle_seconds
        self.heartbeat_every = max(0.1, min(idle / 3, 5.0))
        self.leased: set[Attempt] = set()  # attempts whose leases the last heartbeat extended
        self.canceller = Canceller(ctx.running, reporter, ctx.settings.cancel_grace_seconds)
        self.token: datetime | None = None  # our claim on our name (workers_table)
        self.redispatch = Redispatcher(
            ctx.sessions, ctx.stream, ctx.dispatcher, ctx.config.queues, ctx.settings
        )
        registry = load_handlers(ctx.settings.handler_module_list)  # imported already
        self.retention = retention.Policy.of(ctx.settings, registry)
        self.callbacks = CallbackDuty(ctx)
        self.schedules = ScheduleDuty(
            ctx.sessions, ctx.dispatcher, registry, ctx.config.queues, ctx.settings
        )

    def lease_loops(self) -> list[Coroutine[Any, Any, None]]:
        """Heartbeat and entry refresh: they run until the worker has handed back its jobs,
        so that jobs finishing during the grace period are not reclaimed meanwhile."""
        return [
            self._every(self.heartbeat_every, self.heartbeat, until_stop=False),
            self._every(self.heartbeat_every, self.refresh_entries, until_stop=False),
        ]

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The other duties: they stop as soon as the worker stops."""
        s = self.ctx.settings
        return [
            self._every(s.promote_interval_seconds, self.poll_due),
            self._reconcile_loop(),
            self._every(PRUNE_EVERY_SECONDS, self.prune_finished),
            self._every(CALLBACK_EVERY_SECONDS, self.callbacks.deliver_callbacks),
        ]

    async def _every(
        self, seconds: float, duty: Callable[[], Awaitable[None]], *, until_stop: bool = True
    ) -> None:
        """Run ``duty`` every ``seconds`` until cancelled, or (``until_stop``) until the worker
        stops, should a cancellation be swallowed on the way (redis-py can)."""
        while not (until_stop and self.ctx.stopping.is_set()):
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
            "name": self.ctx.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.ctx.config.queues,
            "concurrency": self.ctx.config.concurrency,
            "in_flight": len(self.ctx.running),
        }

    async def register(self) -> None:
        """Claim our name (raises ``NameInUse`` if a live worker holds it)."""
        self.token = await workers_table.claim_name(
            self.ctx.sessions, self._worker_values(), self.ctx.lease_seconds
        )

    async def unregister(self) -> None:
        try:
            async with self.ctx.sessions.begin() as session:
                if self.token is not None:
                    await workers_table.release_name(session, self.ctx.name, self.token)
            for stream in self.ctx.all_streams:
                mine = [
                    c for c in await self.ctx.stream.consumers(stream) if c["name"] == self.ctx.name
                ]
                if mine and mine[0]["pending"] == 0:
                    await self.ctx.stream.delete_consumer(stream, self.ctx.name)
        except Exception as exc:
            log.warning("could not unregister: %s", exc)

    async def heartbeat(self) -> None:
        """Extend our leases in Postgres, and stop the attempts a cancel was requested for.
        A loop of its own: a slow or hung Redis must never delay a lease extension past the
        lease."""
        ctx = self.ctx
        async with ctx.db.acquire() as conn:
            leases = await attempts.extend_leases(
                conn, ctx.name, ctx.running.attempts(), ctx.lease_seconds
            )
        self.leased = leases.held
        self.canceller.requested(leases.cancel)
        async with ctx.sessions.begin() as session:
            if self.token is not None and not await workers_table.beat(
                session, self._worker_values(), self.token
            ):
                shutdown.displaced(ctx.name)

    async def refresh_entries(self) -> None:
        """Reset the idle time of our pending entries in Redis, so XAUTOCLAIM leaves them.

        Only attempts we still hold (at the last heartbeat) are refreshed: after a reclaim,
        XCLAIM would take the entry back from the worker that runs the newer attempt.
        """
        mine = [r.delivery for r in self.ctx.running if r.attempt in self.leased]
        await self.ctx.stream.refresh(self.ctx.name, mine + self.ctx.running.held)

    # -- promotion and dispatch -------------------------------------------------------------------

    async def poll_due(self) -> None:
        """One statement asks what is due; then promote due jobs (and sweep in turn), and make
        the jobs of due schedule slots (always until the declared schedules are synced). A
        failure of one does not keep the other from running."""
        async with self.ctx.db.acquire() as conn:
            due = await repository.due_work(conn, self.ctx.config.queues)
        try:
            await self.redispatch.promote_and_sweep(promote=due.jobs)
        except Exception as exc:
            log.warning("promote_and_sweep failed: %s", exc)
        if due.slots or not self.schedules.synced:
            await self.schedules.run_schedules()

    # -- reclaim ------------------------------------------------------------------------------

    async def entries_vanished(self, queue: str, stream: str, count: int) -> None:
        """Pending entries were deleted from the stream: their queue's marks are forgotten
        (with a loss record) and every queued job of it is sent again."""
        await self.redispatch.entries_vanished(queue, stream, count)

    async def reclaim(self, ids: Sequence[UUID] | None) -> int:
        """Fail the attempts whose lease lapsed (``worker lost``): retry, or dead at the cap.
        Never our own live attempts: our heartbeat renews those once Postgres answers."""
        total = 0
        while True:
            async with self.ctx.db.acquire() as conn:
                rows = await attempts.reclaim_expired(
                    conn,
                    self.ctx.name,
                    self.ctx.backoff,
                    self.ctx.config.queues,
                    live=self.ctx.running.attempts(),
                    ids=ids,
                    limit=RECLAIM_BATCH,
                )
            total += len(rows)
            dead = [r.id for r in rows if r.status == JobStatus.DEAD]
            await self.ctx.changes.publish(dead, [r.id for r in rows if r.status != JobStatus.DEAD])
            telemetry.reclaimed(rows, self.ctx.name)
            await self.reporter.dead_lettered(
                [
                    Dead(r.id, r.type, r.queue, r.attempts, r.errors)
                    for r in rows
                    if r.status == JobStatus.DEAD
                ]
            )
            if ids is not None or len(rows) < RECLAIM_BATCH:
                return total

    # -- retention ----------------------------------------------------------------------------

    async def prune_finished(self) -> None:
        """Delete finished jobs past their retention, in small batches (app.jobs.retention);
        one worker at a time, the others skip."""
        while True:
            async with self.ctx.db.acquire() as conn:
                pruned = await retention.prune_pass(conn, self.retention)
            if pruned.total:
                log.info("pruned finished jobs", extra={"deleted": pruned.total})
            if not pruned.more or self.ctx.stopping.is_set():
                return

    # -- reconcile ----------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while not self.ctx.stopping.is_set():
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconcile failed: %s", exc)
            loss = self.ctx.stream.data_loss
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and this loop then outlived the shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ctx.settings.reconcile_seconds):
                    await loss.wait()

    async def reconcile(self) -> None:
        """Compare Postgres with Redis and repair what Redis lost."""
        self.ctx.stream.data_loss.clear()
        try:
            await self.redispatch.repair()
        finally:  # lapsed leases are reclaimed even while Redis is unreachable
            await self.reclaim(None)
        await self.redispatch.check_entries()
        await self._prune()

    async def _prune(self) -> None:
        """Forget long-gone workers; delete their consumers only once nothing is pending."""
        async with self.ctx.sessions.begin() as session:
            gone = await workers_table.stale_workers(session, WORKER_ROW_TTL_SECONDS)
            await workers_table.remove_workers(session, gone)
        idle_ms = WORKER_ROW_TTL_SECONDS * 1000
        for stream in self.ctx.all_streams:
            for consumer in await self.ctx.stream.consumers(stream):
                if consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                    await self.ctx.stream.delete_consumer(stream, consumer["name"])
