"""Read-side SQL: lookups, keyset-paginated listings, history, queue counts, live workers.

The workers' own writes to the ``workers`` table are in :mod:`app.jobs.workers_table`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from sqlalchemy import Select, and_, func, or_, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobEventRow, JobRow, WorkerRow
from app.errors import InvalidInput
from app.jobs.status import JobStatus


@dataclass(frozen=True)
class Cursor:
    """Opaque keyset position: the (sort time, id) of the last item of the previous page."""

    at: datetime
    id: UUID

    def encode(self) -> str:
        raw = f"{self.at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            at, _, job_id = raw.partition("|")
            parsed = datetime.fromisoformat(at)
            if parsed.tzinfo is None:
                raise ValueError("naive timestamp")
            return cls(parsed.astimezone(UTC), UUID(job_id))
        except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError) as exc:
            raise InvalidInput("invalid cursor") from exc


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    type: str | None = None
    queue: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    owner: str | None = None


async def get_job(session: AsyncSession, job_id: UUID) -> JobRow | None:
    return await session.get(JobRow, job_id, populate_existing=True)


def _apply(stmt: Select[JobRow], f: JobFilter) -> Select[JobRow]:
    conditions = []
    if f.status is not None:
        conditions.append(JobRow.status == f.status.value)
    if f.type is not None:
        conditions.append(JobRow.type == f.type)
    if f.queue is not None:
        conditions.append(JobRow.queue == f.queue)
    if f.created_after is not None:
        conditions.append(JobRow.created_at > f.created_after)
    if f.created_before is not None:
        conditions.append(JobRow.created_at < f.created_before)
    if f.owner is not None:
        conditions.append(JobRow.owner == f.owner)
    return stmt.where(*conditions) if conditions else stmt


def listing(f: JobFilter, limit: int, cursor: Cursor | None) -> Select[JobRow]:
    """The listing query: a keyset scan of ``ix_jobs_created`` or of the ``ix_jobs_*_created``
    index of a filter column, newest first (one row more than ``limit``, to know if more)."""
    stmt = _apply(select(JobRow), f)
    if cursor is not None:
        stmt = stmt.where(tuple_(JobRow.created_at, JobRow.id) < (cursor.at, cursor.id))
    return stmt.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)


async def list_jobs(
    session: AsyncSession, f: JobFilter, limit: int, cursor: Cursor | None
) -> tuple[list[JobRow], Cursor | None]:
    """Newest first; the cursor is the (created_at, id) of the last row returned."""
    rows = list((await session.scalars(listing(f, limit, cursor))).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (Cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)


async def list_dead(
    session: AsyncSession, f: JobFilter, limit: int, cursor: Cursor | None
) -> tuple[list[JobRow], Cursor | None]:
    """The DLQ: dead jobs not removed from it, most recently dead first."""
    stmt = _apply(
        select(JobRow).where(
            JobRow.status == JobStatus.DEAD.value, JobRow.dlq_removed_at.is_(None)
        ),
        f,
    )
    if cursor is not None:
        stmt = stmt.where(
            or_(
                JobRow.finished_at < cursor.at,
                and_(JobRow.finished_at == cursor.at, JobRow.id < cursor.id),
            )
        )
    stmt = stmt.order_by(JobRow.finished_at.desc(), JobRow.id.desc()).limit(limit + 1)
    rows = list((await session.scalars(stmt)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    nxt = Cursor(last.finished_at, last.id) if more and last and last.finished_at else None
    return rows, nxt


async def in_dlq(session: AsyncSession, job_id: UUID) -> bool:
    stmt = select(JobRow.id).where(
        JobRow.id == job_id, JobRow.status == JobStatus.DEAD.value, JobRow.dlq_removed_at.is_(None)
    )
    return (await session.scalar(stmt)) is not None


async def events(session: AsyncSession, job_id: UUID) -> list[JobEventRow]:
    stmt = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
    return list((await session.scalars(stmt)).all())


# The WHERE clause is the predicate of the partial index ``ix_jobs_open``, so the counts come
# from an index-only scan of the unfinished (and dead) rows, never from the whole table.
QUEUE_COUNTS = (
    "SELECT queue, status, count(*) AS n FROM jobs"
    " WHERE status NOT IN ('succeeded', 'cancelled') GROUP BY queue, status"
)


async def queue_counts(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Per queue and open status, from the partial index over unfinished rows."""
    result = await session.execute(text(QUEUE_COUNTS))
    counts: dict[str, dict[str, int]] = {}
    for row in result:
        counts.setdefault(row.queue, {})[row.status] = int(row.n)
    return counts


# -- workers -------------------------------------------------------------------------------------


async def live_workers(session: AsyncSession, within_seconds: float) -> list[WorkerRow]:
    stmt = (
        select(WorkerRow)
        .where(
            WorkerRow.last_seen_at
            > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, within_seconds)
        )
        .order_by(WorkerRow.name)
    )
    return list((await session.scalars(stmt)).all())
