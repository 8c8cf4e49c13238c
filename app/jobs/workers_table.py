"""The ``workers`` table: each worker process's row, written by the worker itself.

A worker's name is its stable identity: its Redis consumer, and the ``worker`` of the attempts
it runs (half of their fencing token). So one live process per name. A process claims its name
with :func:`claim_name`; the row then carries that process's token (its ``started_at``), and
every later write of that process (heartbeat, removal) is guarded by it:

- a name whose heartbeat is older than the lease (``CONVEYOR_CLAIM_IDLE_SECONDS``) is free: its
  holder is gone, and so are its leases;
- a name held by a fresher heartbeat is watched: if the heartbeat moves on, a live process holds
  it and the claim fails with :class:`NameInUse`; if it lapses (a crashed holder), the name is
  taken over. One guarded upsert decides each try, so two processes started together with one
  name cannot both win;
- a process whose heartbeat finds another token in its row was frozen longer than its lease
  and lost its name meanwhile (:func:`beat` returns False): it must stop at once.

The API reads the live rows (``queries.live_workers``); any worker prunes long-gone ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import WorkerRow

log = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Holder:
    """The process that holds a name, as its row shows it."""

    host: str
    pid: int
    token: datetime
    last_seen_at: datetime
    age_seconds: float  # since its last heartbeat, on the Postgres clock


class NameInUse(Exception):
    """Another live process holds this worker name."""

    def __init__(self, name: str, holder: Holder) -> None:
        super().__init__(
            f"worker name {name!r} is in use by a live worker (host {holder.host}, pid"
            f" {holder.pid}, started {holder.token.isoformat()}); stop that worker or choose"
            " another --name"
        )
        self.name = name
        self.holder = holder


def _older_than(seconds: float) -> ColumnElement[bool]:
    return WorkerRow.last_seen_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds)


async def try_claim(
    session: AsyncSession, values: dict[str, Any], live_seconds: float
) -> datetime | None:
    """Take the name if it is free (no row, or a heartbeat older than ``live_seconds``); return
    the new token, or None when a fresher heartbeat holds it."""
    fresh = {**values, "in_flight": 0, "started_at": func.now(), "last_seen_at": func.now()}
    stmt = insert(WorkerRow).values(fresh)
    upsert = stmt.on_conflict_do_update(
        index_elements=[WorkerRow.name],
        set_={
            "host": stmt.excluded.host,
            "pid": stmt.excluded.pid,
            "queues": stmt.excluded.queues,
            "concurrency": stmt.excluded.concurrency,
            "in_flight": 0,
            "started_at": func.now(),
            "last_seen_at": func.now(),
        },
        where=_older_than(live_seconds),
    ).returning(WorkerRow.started_at)
    token: datetime | None = await session.scalar(upsert)
    return token


async def holder(session: AsyncSession, name: str) -> Holder | None:
    age = func.extract("epoch", func.now() - WorkerRow.last_seen_at)
    row = (
        await session.execute(
            select(
                WorkerRow.host, WorkerRow.pid, WorkerRow.started_at, WorkerRow.last_seen_at, age
            ).where(WorkerRow.name == name)
        )
    ).one_or_none()
    return None if row is None else Holder(row[0], row[1], row[2], row[3], float(row[4]))


async def claim_name(
    sessions: async_sessionmaker[AsyncSession], values: dict[str, Any], live_seconds: float
) -> datetime:
    """Claim ``values["name"]`` for this process and return its token; raise
    :class:`NameInUse` if a live process holds it. Waits at most about ``live_seconds``."""
    name = values["name"]
    seen: Holder | None = None
    while True:
        async with sessions.begin() as session:
            token = await try_claim(session, values, live_seconds)
            current = None if token is not None else await holder(session, name)
        if token is not None:
            if seen is not None:
                log.info("took over worker name %r: its holder's heartbeat lapsed", name)
            return token
        if current is None:
            continue  # its row was just deleted: try again at once
        if seen is None:
            seen = current
            log.warning(
                "worker name %r is held by host %s pid %d (last heartbeat %.1fs ago): waiting"
                " up to %.0fs to see whether it is alive",
                name,
                current.host,
                current.pid,
                current.age_seconds,
                live_seconds,
            )
        elif (current.token, current.last_seen_at) != (seen.token, seen.last_seen_at):
            raise NameInUse(name, current)  # its heartbeat moved on (or another took it)
        await asyncio.sleep(CLAIM_POLL_SECONDS)


async def beat(session: AsyncSession, values: dict[str, Any], token: datetime) -> bool:
    """The heartbeat's write: refresh our row (re-create it if it was removed). False when
    another process holds the name now (it took it over while we were not heartbeating)."""
    stmt = insert(WorkerRow).values({**values, "started_at": token, "last_seen_at": func.now()})
    upsert = stmt.on_conflict_do_update(
        index_elements=[WorkerRow.name],
        set_={"in_flight": stmt.excluded.in_flight, "last_seen_at": func.now()},
        where=(WorkerRow.started_at == token) & (WorkerRow.pid == stmt.excluded.pid),
    ).returning(WorkerRow.name)
    return (await session.scalar(upsert)) is not None


async def release_name(session: AsyncSession, name: str, token: datetime) -> None:
    """Remove our row on a clean stop (not a row that another process holds now)."""
    await session.execute(
        delete(WorkerRow).where(WorkerRow.name == name, WorkerRow.started_at == token)
    )


async def remove_workers(session: AsyncSession, names: Sequence[str]) -> None:
    if names:
        await session.execute(delete(WorkerRow).where(WorkerRow.name.in_(names)))


async def stale_workers(session: AsyncSession, older_than_seconds: float) -> list[str]:
    stmt = select(WorkerRow.name).where(_older_than(older_than_seconds))
    return list((await session.scalars(stmt)).all())
