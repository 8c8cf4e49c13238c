"""The stream layout every API and worker process must share, recorded in Postgres.

A job's stream is ``CONVEYOR_REDIS_PREFIX`` + its queue + ``crc32(id) mod CONVEYOR_PARTITIONS``
+ its band. A process with another prefix or partition count sends entries to streams no
worker reads (or reads streams nobody sends to), and the jobs wait forever with their
dispatch marks set. So the first process to start records the layout in ``conveyor_state``
and every later one compares its own with it and refuses to start on a difference.

A deployment that changes the layout on purpose stops every process and runs
``conveyor migrate --repartition`` with the new values: it records them and forgets every
queued job's dispatch mark, so the workers' sweep sends each one to its new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.engine import create_engine, create_session_factory
from app.jobs import queries
from app.settings import Settings

log = logging.getLogger(__name__)

LAYOUT_KEY = "stream-layout"
RETRY_SECONDS = 2.0

_RECORD_FIRST = """
WITH ins AS (
    INSERT INTO conveyor_state (key, value) VALUES (:key, :value)
    ON CONFLICT (key) DO NOTHING RETURNING value
)
SELECT value FROM ins UNION ALL SELECT value FROM conveyor_state WHERE key = :key
"""
_RECORD = """
INSERT INTO conveyor_state (key, value) VALUES (:key, :value)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()
"""
_OLD = "SELECT value FROM conveyor_state WHERE key = :key"
_FORGET_ALL = (
    "UPDATE jobs SET dispatched_at = NULL WHERE status = 'queued' AND dispatched_at IS NOT NULL"
)


@dataclass(frozen=True)
class Layout:
    partitions: int
    redis_prefix: str

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        return cls(settings.partitions, settings.redis_prefix)

    @classmethod
    def decode(cls, value: str) -> Layout:
        fields = json.loads(value)
        return cls(int(fields["partitions"]), str(fields["redis_prefix"]))

    def encode(self) -> str:
        return json.dumps({"partitions": self.partitions, "redis_prefix": self.redis_prefix})

    def __str__(self) -> str:
        return f"CONVEYOR_PARTITIONS={self.partitions} CONVEYOR_REDIS_PREFIX={self.redis_prefix}"


class LayoutMismatch(RuntimeError):
    """This process's layout differs from the one recorded: it must not start."""

    def __init__(self, recorded: Layout, wanted: Layout) -> None:
        super().__init__(
            f"this database's streams are laid out with {recorded}, but this process has"
            f" {wanted}. Every API and worker process must use the same values (otherwise"
            " jobs go to streams no worker reads). To change them on purpose, stop every"
            " process and run `conveyor migrate --repartition` with the new values."
        )
        self.recorded = recorded
        self.wanted = wanted


async def check(session: AsyncSession, wanted: Layout) -> None:
    """Record ``wanted`` if no layout is recorded yet; raise :class:`LayoutMismatch` if
    another one is."""
    params = {"key": LAYOUT_KEY, "value": wanted.encode()}
    recorded = Layout.decode(str((await session.execute(text(_RECORD_FIRST), params)).scalar()))
    if recorded != wanted:
        raise LayoutMismatch(recorded, wanted)


async def verify(sessions: async_sessionmaker[AsyncSession], wanted: Layout) -> None:
    async with sessions.begin() as session:
        await check(session, wanted)


async def guard(
    sessions: async_sessionmaker[AsyncSession], wanted: Layout
) -> asyncio.Task[None] | None:
    """For the API at startup: check now and raise on a mismatch. While Postgres does not
    answer, start anyway (it answers 503 meanwhile) and check again in the background; a
    mismatch found then stops the process. Returns that background task, if any."""
    try:
        await verify(sessions, wanted)
        return None
    except LayoutMismatch:
        raise
    except Exception as exc:
        log.warning("could not check the stream layout (%s); retrying", type(exc).__name__)
        return asyncio.create_task(_verify_later(sessions, wanted), name="layout-check")


async def _verify_later(sessions: async_sessionmaker[AsyncSession], wanted: Layout) -> None:
    while True:
        await asyncio.sleep(RETRY_SECONDS)
        try:
            await verify(sessions, wanted)
            return
        except LayoutMismatch as exc:
            log.error("stopping: %s", exc)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except Exception as exc:
            log.debug("stream layout check failed again: %s", type(exc).__name__)


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def repartition(session: AsyncSession, wanted: Layout) -> tuple[Layout | None, int]:
    """Record ``wanted`` as the layout and forget every queued job's dispatch mark, so the
    sweep sends each to its stream in the new layout. Returns the layout recorded before
    (None if none was) and how many marks were forgotten."""
    before = await session.scalar(text(_OLD), {"key": LAYOUT_KEY})
    await session.execute(text(_RECORD), {"key": LAYOUT_KEY, "value": wanted.encode()})
    result = await session.execute(text(_FORGET_ALL))
    forgotten = int(getattr(result, "rowcount", 0) or 0)
    return (Layout.decode(before) if before is not None else None), forgotten


async def repartition_database(settings: Settings) -> int:
    """``conveyor migrate --repartition``: refuses while a worker heartbeats; returns the
    exit status."""
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine).begin() as session:
            live = await queries.live_workers(session, settings.claim_idle_seconds)
            if live:
                names = ", ".join(w.name for w in live)
                print(
                    f"refusing to repartition: workers are running ({names}); stop every"
                    " worker and API process first",
                    file=sys.stderr,
                )
                return 1
            wanted = Layout.of(settings)
            before, forgotten = await repartition(session, wanted)
    finally:
        await engine.dispose()
    print(
        f"stream layout: {before or 'none'} -> {wanted}; {forgotten} queued job(s) will be"
        " sent again to their new streams by the workers"
    )
    return 0
