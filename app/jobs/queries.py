"""Read-side SQL: lookups, keyset-paginated listings, history, queue counts, live workers.

The workers' own writes to the ``workers`` table are in :mod:`app.jobs.workers_table`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import Select, Text, and_, cast, func, or_, select, text, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import (
    NOT_RUNNING_SQL,
    OPEN_NOT_RUNNING_SQL,
    RUNNING_SQL,
    TERMINAL_SQL,
    JobEventRow,
    JobRow,
    WorkerRow,
)
from app.errors import InvalidInput
from app.jobs.status import JobStatus

_T = TypeVar("_T", bound=Any)


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


async def db_now(session: AsyncSession) -> datetime:
    """The Postgres clock, the one every transition stamps its times with."""
    now: datetime = await session.scalar(text("SELECT statement_timestamp()"))
    return now


async def get_job(session: AsyncSession, job_id: UUID) -> JobRow | None:
    return await session.get(JobRow, job_id, populate_existing=True)


def _apply(stmt: Select[_T], f: JobFilter) -> Select[_T]:
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


# What a job adds to a page, about as it is sent: its JSON fields, plus the small ones.
_ITEM_BYTES = (
    func.octet_length(cast(JobRow.payload, Text))
    + func.coalesce(func.octet_length(cast(JobRow.result, Text)), 0)
    + func.octet_length(cast(JobRow.errors, Text))
    + func.coalesce(func.octet_length(cast(JobRow.progress, Text)), 0)
    + func.coalesce(func.octet_length(JobRow.callback_url), 0)
    + func.coalesce(func.octet_length(JobRow.callback_last_error), 0)
    + func.coalesce(func.octet_length(JobRow.unique_key), 0)
    + func.coalesce(func.octet_length(JobRow.idempotency_key), 0)
    + 1024  # the fixed fields: ids, names, timestamps, counters and their keys
)


def listing(f: JobFilter, limit: int, cursor: Cursor | None) -> Select[Any]:
    """The listing query: the ``id``, ``created_at`` and ``size`` of ``limit + 1`` jobs (one
    more, to know if more follow), newest first.

    The rows that are not running come from a keyset scan of ``ix_jobs_created`` or of the
    ``ix_jobs_*_created`` index of a filter column; the running rows, which those indexes leave
    out (decision 0029), from ``ix_jobs_lease``. Postgres merges the two in order. Each branch
    states its status condition as a literal, so that the planner can match the partial
    indexes whatever the filter's bound parameters are.
    """
    columns = (JobRow.id, JobRow.created_at, _ITEM_BYTES.label("size"))
    order = (JobRow.created_at.desc(), JobRow.id.desc())
    conditions = [NOT_RUNNING_SQL, RUNNING_SQL]
    if f.status is not None:
        conditions = [RUNNING_SQL if f.status is JobStatus.RUNNING else NOT_RUNNING_SQL]
    branches: list[Select[Any]] = []
    for condition in conditions:
        stmt = _apply(select(*columns), f).where(text(condition))
        if cursor is not None:
            stmt = stmt.where(tuple_(JobRow.created_at, JobRow.id) < (cursor.at, cursor.id))
        branches.append(stmt.order_by(*order).limit(limit + 1))
    if len(branches) == 1:
        return branches[0]
    # Each branch ordered and limited on its own: Postgres merges them (a Merge Append), and
    # the branch of the rows not running reads ``limit + 1`` index entries at any depth.
    both = union_all(*branches).subquery("listed")
    return (
        select(both.c.id, both.c.created_at, both.c.size)
        .order_by(both.c.created_at.desc(), both.c.id.desc())
        .limit(limit + 1)
    )


async def _page(
    session: AsyncSession,
    candidates: Select[Any],
    order: Sequence[Any],
    limit: int,
    max_bytes: int,
) -> tuple[list[JobRow], bool]:
    """The first rows of ``candidates`` (the ``id``, sort key and ``size`` of ``limit + 1``
    jobs) that fit in ``max_bytes`` (always one), up to ``limit``; and whether more follow.

    The sizes are summed in Postgres, so the rows that do not fit are never read out.
    """
    c = candidates.subquery("candidates")
    by = [*(getattr(c.c, col.key).desc() for col in order), c.c.id.desc()]
    sized = select(
        c.c.id,
        func.sum(c.c.size).over(order_by=by).label("upto"),
        func.row_number().over(order_by=by).label("n"),
        func.lead(c.c.id).over(order_by=by).label("next_id"),
    ).subquery("sized")
    stmt = (
        select(JobRow, sized.c.next_id)
        .join(sized, JobRow.id == sized.c.id)
        .where(or_(sized.c.upto <= max_bytes, sized.c.n == 1))
        .order_by(sized.c.n)
    )
    result = (await session.execute(stmt)).all()
    rows = [r[0] for r in result[:limit]]
    return rows, len(result) > limit or bool(result and result[-1][1] is not None)


async def list_jobs(
    session: AsyncSession, f: JobFilter, limit: int, cursor: Cursor | None, max_bytes: int
) -> tuple[list[JobRow], Cursor | None]:
    """Newest first; the cursor is the (created_at, id) of the last row returned. A page ends
    early when the next row would take its items past ``max_bytes``."""
    candidates = listing(f, limit, cursor)
    rows, more = await _page(session, candidates, [JobRow.created_at], limit, max_bytes)
    return rows, (Cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)


async def list_dead(
    session: AsyncSession, f: JobFilter, limit: int, cursor: Cursor | None, max_bytes: int
) -> tuple[list[JobRow], Cursor | None]:
    """The DLQ: dead jobs not removed from it, most recently dead first; pages end early as
    in :func:`list_jobs`."""
    stmt = _apply(
        select(JobRow.id, JobRow.finished_at, _ITEM_BYTES.label("size")).where(
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
    rows, more = await _page(session, stmt, [JobRow.finished_at], limit, max_bytes)
    last = rows[-1] if rows else None
    nxt = Cursor(last.finished_at, last.id) if more and last and last.finished_at else None
    return rows, nxt


async def count_dead(session: AsyncSession, f: JobFilter) -> int:
    """How many jobs in the DLQ match the filter (its ``status`` is ignored)."""
    stmt = _apply(
        select(func.count()).where(
            JobRow.status == JobStatus.DEAD.value, JobRow.dlq_removed_at.is_(None)
        ),
        replace(f, status=None),
    )
    return int(await session.scalar(stmt) or 0)


async def in_dlq(session: AsyncSession, job_id: UUID) -> bool:
    stmt = select(JobRow.id).where(
        JobRow.id == job_id, JobRow.status == JobStatus.DEAD.value, JobRow.dlq_removed_at.is_(None)
    )
    return (await session.scalar(stmt)) is not None


async def events(
    session: AsyncSession, job_id: UUID, after: int | None = None
) -> list[JobEventRow]:
    """The job's events, oldest first; ``after``: only those after this event id."""
    stmt = select(JobEventRow).where(JobEventRow.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEventRow.id > after)
    return list((await session.scalars(stmt.order_by(JobEventRow.id))).all())


_SETTLED = text(
    " ".join(
        (
            "SELECT w.id FROM unnest(CAST(:ids AS uuid[])) AS w(id)",
            "LEFT JOIN jobs j ON j.id = w.id WHERE j.id IS NULL OR j.status IN",
            TERMINAL_SQL,
        )
    )
)


async def settled_among(session: AsyncSession, ids: Sequence[UUID]) -> set[UUID]:
    """Which of these jobs are terminal now (or gone): one statement for any number of ids,
    the slow re-check of every waiter of a process (:mod:`app.jobs.watch`)."""
    if not ids:
        return set()
    return set((await session.scalars(_SETTLED, {"ids": list(ids)})).all())


# Each WHERE clause is the predicate of a partial index (``ix_jobs_open``; ``ix_jobs_lease``
# for the running rows, which ix_jobs_open leaves out; ``ix_jobs_dlq_removed`` for the dead
# jobs taken out of the DLQ), so the counts come from scans of the unfinished (and dead) rows,
# never from the whole table.
QUEUE_COUNTS = " ".join(
    (
        "SELECT queue, status, count(*) AS n FROM jobs WHERE",
        OPEN_NOT_RUNNING_SQL,
        "GROUP BY queue, status",
        "UNION ALL SELECT queue, 'running', count(*) FROM jobs WHERE",
        RUNNING_SQL,
        "GROUP BY queue",
        "UNION ALL SELECT queue, 'dlq_removed', count(*) FROM jobs",
        "WHERE status = 'dead' AND dlq_removed_at IS NOT NULL GROUP BY queue",
    )
)


async def queue_counts(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Per queue and open status, from partial indexes over the unfinished rows; ``dead``
    counts the jobs in the DLQ (not those removed from it, which stay dead)."""
    result = await session.execute(text(QUEUE_COUNTS))
    counts: dict[str, dict[str, int]] = {}
    removed: dict[str, int] = {}
    for row in result:
        if row.status == "dlq_removed":
            removed[row.queue] = int(row.n)
        else:
            counts.setdefault(row.queue, {})[row.status] = int(row.n)
    for queue, n in removed.items():
        counts[queue]["dead"] -= n
        if not counts[queue]["dead"]:
            del counts[queue]["dead"]
            if not counts[queue]:
                del counts[queue]
    return counts


async def state_value(session: AsyncSession, key: str, initial: str) -> str:
    """The ``conveyor_state`` value of ``key``, set to ``initial`` if there was none (the first
    of concurrent callers wins; all get its value)."""
    await session.execute(
        text(
            "INSERT INTO conveyor_state (key, value) VALUES (:key, :value)"
            " ON CONFLICT (key) DO NOTHING"
        ),
        {"key": key, "value": initial},
    )
    value = await session.scalar(
        text("SELECT value FROM conveyor_state WHERE key = :key"), {"key": key}
    )
    return str(value)


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
