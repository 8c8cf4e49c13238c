"""What the worker's loops share: who the worker is, where the stores are, what it holds.

The read side, the reporter and the maintenance duties each get one :class:`WorkerContext`
and nothing else of each other; only :class:`RunningSet` is written by more than one of them.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import JobRow
from app.jobs.dispatch import Dispatcher
from app.jobs.repository import Backoff
from app.settings import Settings
from app.streams.client import Delivery, StreamClient
from app.streams.keys import Keys


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass
class WorkerConfig:
    queues: list[str]
    concurrency: int = 16
    name: str = field(default_factory=default_name)


@dataclass
class Running:
    """One attempt this worker holds: the claimed row and the delivery that brought it."""

    job: JobRow
    delivery: Delivery
    task: asyncio.Task[None] | None = None


class RunningSet:
    """The attempts this worker runs, the deliveries it read but has not claimed yet, and the
    room left under ``--concurrency``."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._jobs: dict[UUID, Running] = {}
        self.held: list[Delivery] = []  # read from Redis, not yet claimed in Postgres
        self._room = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Running]:
        return iter(list(self._jobs.values()))

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    @property
    def free(self) -> int:
        return self.concurrency - len(self._jobs)

    async def wait_for_room(self) -> int:
        async with self._room:
            await self._room.wait_for(lambda: self.free > 0)
            return self.free

    def add(self, entry: Running) -> None:
        self._jobs[entry.job.id] = entry

    async def finished(self, job_ids: list[UUID]) -> None:
        """These attempts' outcomes are written (or fenced off): their room is free again."""
        for job_id in job_ids:
            self._jobs.pop(job_id, None)
        async with self._room:
            self._room.notify_all()


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

    @property
    def keys(self) -> Keys:
        return self.stream.keys

    @property
    def lease_seconds(self) -> float:
        return self.settings.claim_idle_seconds

    @property
    def partitions(self) -> list[tuple[str, int]]:
        return [(q, p) for q in self.config.queues for p in range(self.settings.partitions)]

    @property
    def all_streams(self) -> list[str]:
        return [s for q, p in self.partitions for s in self.keys.partition_streams(q, p)]
