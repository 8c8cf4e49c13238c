"""All SQL on ``schedules``, and the insert of the jobs that schedules make.

A slot's job is inserted with ``ON CONFLICT (schedule, scheduled_for) DO NOTHING`` on the
partial unique index ``uq_jobs_schedule_slot``: whatever runs twice, a slot has one job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow, ScheduleRow
from app.jobs.ids import new_job_id


@dataclass(frozen=True)
class NewJob:
    """A job a schedule makes: for the slot ``scheduled_for``, or by hand (``None``)."""

    id: str
    schedule: str
    scheduled_for: datetime | None
    type: str
    queue: str
    priority: int
    payload: dict[str, Any]
    actor: str | None

    @classmethod
    def of(cls, row: ScheduleRow, slot: datetime | None, actor: str | None) -> NewJob:
        """The job ``row`` makes for ``slot`` (``None``: triggered by hand)."""
        return cls(
            str(new_job_id()), row.name, slot, row.type, row.queue, row.priority, row.payload, actor
        )


@dataclass(frozen=True)
class Advance:
    """Where a schedule goes after a due check: its next slot and latest slot run."""

    name: str
    next_run_at: datetime
    last_run_at: datetime | None


async def db_now(session: AsyncSession) -> datetime:
    """The Postgres clock (the transaction's start): slots are never computed on ours."""
    now = await session.scalar(select(func.now()))
    assert isinstance(now, datetime)
    return now


async def insert(session: AsyncSession, values: dict[str, Any]) -> ScheduleRow | None:
    """A new schedule; ``None`` if the name is taken."""
    stmt = (
        pg_insert(ScheduleRow)
        .values(**values, source="api")
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(ScheduleRow)
    )
    return (await session.scalars(stmt)).one_or_none()


async def get(session: AsyncSession, name: str, *, lock: bool = False) -> ScheduleRow | None:
    stmt = select(ScheduleRow).where(ScheduleRow.name == name)
    if lock:
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one_or_none()


async def page(session: AsyncSession, limit: int, after: str | None) -> list[ScheduleRow]:
    stmt = select(ScheduleRow).order_by(ScheduleRow.name).limit(limit)
    if after is not None:
        stmt = stmt.where(ScheduleRow.name > after)
    return list((await session.scalars(stmt)).all())


async def change(session: AsyncSession, name: str, values: dict[str, Any]) -> ScheduleRow | None:
    stmt = (
        update(ScheduleRow)
        .where(ScheduleRow.name == name)
        .values(**values, updated_at=func.now())
        .returning(ScheduleRow)
    )
    return (await session.scalars(stmt)).one_or_none()


async def remove(session: AsyncSession, name: str) -> bool:
    result = await session.execute(
        delete(ScheduleRow).where(ScheduleRow.name == name).returning(ScheduleRow.name)
    )
    return result.first() is not None


async def lock_due(
    session: AsyncSession, queues: Sequence[str], limit: int
) -> tuple[datetime, list[ScheduleRow]]:
    """Enabled schedules of these queues whose next slot has come (Postgres clock), locked
    until the caller commits; rows another worker holds are skipped, not waited for."""
    now = await db_now(session)
    stmt = (
        select(ScheduleRow)
        .where(
            ScheduleRow.enabled,
            ScheduleRow.next_run_at <= func.now(),
            ScheduleRow.queue.in_(list(queues)),
        )
        .order_by(ScheduleRow.next_run_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return now, list((await session.scalars(stmt)).all())


_INSERT_JOBS = """
WITH r AS (
    SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        id uuid, schedule text, scheduled_for timestamptz, type text, queue text,
        priority int, payload jsonb, actor text, ord int)
), ins AS (
    INSERT INTO jobs (id, type, queue, status, priority, payload, schedule, scheduled_for,
                      run_at, enqueued_at)
    SELECT id, type, queue, 'queued', priority, payload, schedule, scheduled_for,
           coalesce(scheduled_for, now()), now()
    FROM r ORDER BY ord
    ON CONFLICT (schedule, scheduled_for)
        WHERE schedule IS NOT NULL AND scheduled_for IS NOT NULL
    DO NOTHING
    RETURNING *
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, actor)
    SELECT ins.id, 'submitted', 0, r.actor FROM ins JOIN r ON r.id = ins.id
)
SELECT * FROM ins
"""


async def insert_jobs(session: AsyncSession, jobs: Sequence[NewJob]) -> list[JobRow]:
    """Insert queued jobs; a slot that has its job already is skipped (not returned)."""
    if not jobs:
        return []
    rows = [
        {
            "id": j.id,
            "schedule": j.schedule,
            "scheduled_for": j.scheduled_for.isoformat() if j.scheduled_for else None,
            "type": j.type,
            "queue": j.queue,
            "priority": j.priority,
            "payload": j.payload,
            "actor": j.actor,
            "ord": i,
        }
        for i, j in enumerate(jobs)
    ]
    stmt = select(JobRow).from_statement(text(_INSERT_JOBS))
    return list((await session.scalars(stmt, {"rows": json.dumps(rows)})).all())


async def advance(session: AsyncSession, moves: Sequence[Advance]) -> None:
    """Move each schedule to its next slot (and latest slot run) in one statement."""
    if not moves:
        return
    await session.execute(
        text(
            "UPDATE schedules s SET next_run_at = v.next, last_run_at = coalesce(v.last,"
            " s.last_run_at) FROM unnest(CAST(:names AS text[]), CAST(:nexts AS timestamptz[]),"
            " CAST(:lasts AS timestamptz[])) AS v(name, next, last)"
            " WHERE s.name = v.name AND s.enabled"
        ),
        {
            "names": [m.name for m in moves],
            "nexts": [m.next_run_at for m in moves],
            "lasts": [m.last_run_at for m in moves],
        },
    )


async def mark_triggered(session: AsyncSession, name: str) -> None:
    await session.execute(
        update(ScheduleRow).where(ScheduleRow.name == name).values(last_run_at=func.now())
    )


_UPSERT_DECLARED = """
INSERT INTO schedules AS s (name, cron, timezone, type, payload, queue, priority, enabled,
                            missed, next_run_at, source, declared_hash)
VALUES (:name, :cron, :timezone, :type, CAST(:payload AS jsonb), :queue, :priority, true,
        :missed, :next_run_at, 'code', :declared_hash)
ON CONFLICT (name) DO UPDATE SET
    cron = excluded.cron, timezone = excluded.timezone, type = excluded.type,
    payload = excluded.payload, queue = excluded.queue, priority = excluded.priority,
    missed = excluded.missed, source = 'code', declared_hash = excluded.declared_hash,
    next_run_at = CASE WHEN s.enabled THEN excluded.next_run_at END, updated_at = now()
WHERE s.declared_hash IS DISTINCT FROM excluded.declared_hash
RETURNING (xmax = 0) AS inserted
"""


async def upsert_declared(session: AsyncSession, values: dict[str, Any]) -> str | None:
    """Write a schedule declared in code unless the row holds this very declaration already.

    Returns ``"created"``, ``"updated"``, or ``None`` (unchanged). ``enabled`` is never
    touched: a schedule paused over HTTP stays paused.
    """
    params = {**values, "payload": json.dumps(values["payload"])}
    inserted = await session.scalar(text(_UPSERT_DECLARED), params)
    if inserted is None:
        return None
    return "created" if inserted else "updated"


async def declared_names(session: AsyncSession) -> list[str]:
    result = await session.scalars(select(ScheduleRow.name).where(ScheduleRow.source == "code"))
    return list(result.all())
