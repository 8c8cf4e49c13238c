"""What the worker's loops share: who the worker is, where the stores are, what it holds.

The read side, the reporter and the maintenance duties each get one :class:`WorkerContext`
and nothing else of each other; only :class:`RunningSet` is written by more than one of them.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.pool import WORKER, create_pool
from app.jobs.attempts import Claim
from app.jobs.dispatch import Dispatcher
from app.jobs.repository import Backoff
from app.settings import Settings
from app.streams.client import Delivery, StreamClient
from app.streams.keys import Keys
from app.streams.notify import Publisher

Attempt = tuple[UUID, int]  # (job id, claim token): one attempt, never repeated


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass
class WorkerConfig:
    queues: list[str]
    concurrency: int = 16
    name: str = field(default_factory=default_name)
    metrics_port: int | None = None  # serve this process's own metrics there


@dataclass(slots=True)
class Running:
    """One attempt this worker holds: the claim and the delivery that brought it."""

    job: Claim
    delivery: Delivery
    task: asyncio.Task[None] | None = None
    # A cancel of the job was requested: the handler's context shows it (``ctx.cancelled``).
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reported: bool = False  # its outcome went to the reporter (at most once)

    @property
    def attempt(self) -> Attempt:
        return (self.job.id, self.job.token)


class RunningSet:
    """The attempts this worker runs (by ``(id, token)``; never two of one job), the
    deliveries it read but has not claimed yet, and the room left under ``--concurrency``.

    Room is reserved before a read or a claim and given back after it, so however many read
    loops and XAUTOCLAIM pages run at once, at most ``concurrency`` attempts are running.
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._attempts: dict[Attempt, Running] = {}
        self._by_job: dict[UUID, Running] = {}
        self._reserved = 0
        self._room = asyncio.Event()
        self.held: list[Delivery] = []  # read from Redis, not yet claimed in Postgres

    def __len__(self) -> int:
        return len(self._attempts)

    def __iter__(self) -> Iterator[Running]:
        return iter(list(self._attempts.values()))

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_job

    def get(self, job_id: UUID) -> Running | None:
        return self._by_job.get(job_id)

    def attempts(self) -> list[Attempt]:
        return list(self._attempts)

    @property
    def free(self) -> int:
        return self.concurrency - len(self._attempts) - self._reserved

    def reserve_now(self, most: int) -> int:
        """Reserve up to ``most`` slots without waiting; returns how many (maybe 0)."""
        n = max(0, min(self.free, most))
        self._reserved += n
        return n

    async def reserve(self, most: int) -> int:
        """Wait for room, then reserve between 1 and ``most`` slots."""
        while self.free <= 0:
            self._room.clear()
            await self._room.wait()
        return self.reserve_now(most)

    def unreserve(self, n: int) -> None:
        """Give reserved slots back; attempts added meanwhile hold their own."""
        if n:
            self._reserved -= n
            self._room.set()

    def add(self, entry: Running) -> None:
        """Call while holding a reservation (the caller gives it back afterwards)."""
        self._attempts[entry.attempt] = entry
        self._by_job[entry.job.id] = entry

    def finished(self, attempts: Sequence[Attempt]) -> None:
        """These attempts' outcomes are written (or fenced off): their room is free again."""
        for attempt in attempts:
            entry = self._attempts.pop(attempt, None)
            if entry is not None:
                del self._by_job[attempt[0]]
        self._room.set()

    def take_held(self, most: int) -> list[Delivery]:
        """Up to ``most`` held deliveries, leaving those of jobs we are running (their turn
        comes when the running attempt ends)."""
        taken: list[Delivery] = []
        kept: list[Delivery] = []
        for d in self.held:
            if len(taken) < most and d.job_id not in self._by_job:
                taken.append(d)
            else:
                kept.append(d)
        self.held[:] = kept  # the same list: a caller may hold it across an await
        return taken


@dataclass
class WorkerContext:
    name: str
    settings: Settings
    config: WorkerConfig
    sessions: async_sessionmaker[AsyncSession]
    stream: StreamClient
    dispatcher: Dispatcher
    running: RunningSet
    backoff: Backoff
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _db: asyncpg.Pool | None = None

    @property
    def db(self) -> asyncpg.Pool:
        """The hot path's pool (claim, complete, heartbeat, release, reclaim)."""
        if self._db is None:
            raise RuntimeError("the worker's database pool is not open yet")
        return self._db

    async def open_db(self, max_size: int) -> None:
        if self._db is None:
            self._db = await create_pool(self.settings, max_size=max_size, application_name=WORKER)

    async def close_db(self) -> None:
        if self._db is not None:
            await self._db.close()

    @property
    def keys(self) -> Keys:
        return self.stream.keys

    @property
    def changes(self) -> Publisher:
        """The job-change channel that wakes the API's waiters (app/streams/notify.py)."""
        return Publisher(self.stream.redis, self.keys.changes)

    @property
    def lease_seconds(self) -> float:
        return self.settings.claim_idle_seconds

    @property
    def partitions(self) -> list[tuple[str, int]]:
        return [(q, p) for q in self.config.queues for p in range(self.settings.partitions)]

    @property
    def all_streams(self) -> list[str]:
        return [s for q, p in self.partitions for s in self.keys.partition_streams(q, p)]
