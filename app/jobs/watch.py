"""The in-process waiters of an API process: ``?wait=`` requests and SSE followers.

One :class:`Watch` per API process holds a dict ``job id → waiters`` (each an
:class:`asyncio.Event`). Two things wake them, and no waiter ever polls Postgres alone:

- the process's one subscription to ``P:jobs-changed`` (:mod:`app.streams.notify`), fed by
  the workers' claim, completion, reclaim, promotion and progress batches and by the API's
  own terminal transitions (which also wake this process's waiters directly, Redis or not);
- a slow re-check: every ``CONVEYOR_WAIT_RECHECK_SECONDS`` one statement asks Postgres which
  of all the jobs waited on in this process are terminal (or gone). It covers a lost message
  and a Redis outage; a waiter then answers late, never wrongly.

A waiter is registered *before* its caller reads the job, so a change between that read and
the wait is never missed. The waiters' reads are grouped (:mod:`app.jobs.lookup`): a burst
of requests, or of wake-ups, costs a few statements, not one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.jobs.lookup import Lookup
from app.jobs.queries import settled_among
from app.streams.notify import Change, Publisher, Subscriber

log = logging.getLogger(__name__)

STOP_SECONDS = 3.0


@dataclass(eq=False)
class Waiter:
    """One request's wake-up; ``changes``: woken by every change, not only terminal ones."""

    changes: bool
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, seconds: float) -> bool:
        """Until woken or ``seconds`` pass; True when woken. Re-arms for the next wake."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.event.wait()
        woken = self.event.is_set()
        self.event.clear()
        return woken


class Watch:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        lookup: Lookup,
        publisher: Publisher | None,
        subscriber_url: str | None,
        channel: str,
        recheck_seconds: float,
        redis_timeout: float = 2.0,
    ) -> None:
        self._sessions = sessions
        self.lookup = lookup  # the waiters' reads of their jobs, grouped
        self._publisher = publisher
        self.recheck_seconds = recheck_seconds
        self._waiters: dict[UUID, set[Waiter]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.subscriber = (
            Subscriber(subscriber_url, channel, self.deliver, redis_timeout)
            if subscriber_url
            else None
        )
        self.rechecks = 0  # how many re-check statements this process ran
        # also told of every change (the dispatcher drops confirmations it no longer needs)
        self.listeners: list[Callable[[Change], None]] = []

    def start(self) -> None:
        if self.subscriber is not None:
            self._tasks.append(asyncio.create_task(self.subscriber.run()))
        self._tasks.append(asyncio.create_task(self._recheck_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a close stuck on a dead Redis connection is left behind
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_SECONDS)
            if stuck:
                log.warning("job-change subscription did not stop in time; going on")
        self._tasks.clear()
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()

    def __len__(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    @contextmanager
    def waiter(self, job_id: UUID, *, changes: bool = False) -> Iterator[Waiter]:
        """Register a waiter for ``job_id`` for the duration of the block."""
        waiter = Waiter(changes)
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]

    def deliver(self, change: Change) -> None:
        """Wake the waiters of the jobs in ``change`` (a message, or a local transition)."""
        self._wake(change.terminal, terminal=True)
        self._wake(change.changed, terminal=False)
        for listener in self.listeners:
            listener(change)

    def _wake(self, ids: Iterable[UUID], *, terminal: bool) -> None:
        for job_id in ids:
            for waiter in self._waiters.get(job_id, ()):
                if terminal or waiter.changes:
                    waiter.event.set()

    async def publish(self, terminal: Iterable[UUID], changed: Iterable[UUID] = ()) -> None:
        """A transition this process made: wake its own waiters now, and the other
        processes' through Redis."""
        change = Change(frozenset(terminal), frozenset(changed))
        self.deliver(change)
        if self._publisher is not None:
            await self._publisher.publish(change.terminal, change.changed)

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_seconds)
            try:
                await self.recheck()
            except Exception as exc:  # Postgres away: the waiters time out as they would
                log.warning("re-check of waiting jobs failed: %s", exc)

    async def recheck(self) -> None:
        """One statement for every job waited on in this process."""
        ids = list(self._waiters)
        if not ids:
            return
        self.rechecks += 1
        async with self._sessions() as session:
            settled = await settled_among(session, ids)
        self._wake(settled, terminal=True)
