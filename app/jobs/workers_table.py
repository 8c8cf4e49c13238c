"""The ``workers`` table: each worker process's row, written by the worker itself.

A row is created when a worker starts, refreshed by its heartbeat, and deleted when it stops
(or, long after it died, by any worker's prune). The API reads the live ones
(``queries.live_workers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import WorkerRow


async def upsert_worker(session: AsyncSession, values: dict[str, Any]) -> None:
    stmt = insert(WorkerRow).values(**values, last_seen_at=func.now())
    stmt = stmt.on_conflict_do_update(
        index_elements=[WorkerRow.name],
        set_={"in_flight": stmt.excluded.in_flight, "last_seen_at": func.now()},
    )
    await session.execute(stmt)


async def remove_workers(session: AsyncSession, names: Sequence[str]) -> None:
    if names:
        await session.execute(delete(WorkerRow).where(WorkerRow.name.in_(names)))


async def stale_workers(session: AsyncSession, older_than_seconds: float) -> list[str]:
    stmt = select(WorkerRow.name).where(
        WorkerRow.last_seen_at
        < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds)
    )
    return list((await session.scalars(stmt)).all())
