"""``make_job(session, status=...)``: a job row in any status, consistent with its CHECK
constraints and with what the transitions leading there would have written.

Times are relative to the transaction's ``now()`` (fixed for the whole transaction), so a
"due" job is due and a "lapsed" lease has lapsed for every statement of the test.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs.status import JobStatus

WORKER = "w-factory"
MAX_ATTEMPTS = 3
SECOND = timedelta(seconds=1)


def _error(attempt: int) -> dict[str, Any]:
    return {"attempt": attempt, "error": "boom", "type": "RuntimeError", "at": "2024-01-01T00:00Z"}


def _by_status(status: JobStatus, now: datetime) -> dict[str, Any]:
    """The columns a job in ``status`` has, beyond the common ones."""
    earlier = now - 10 * SECOND
    if status is JobStatus.SCHEDULED:
        return {"run_at": now - SECOND}  # due
    if status is JobStatus.QUEUED:
        return {"enqueued_at": earlier}
    if status is JobStatus.RUNNING:
        lease = now + 30 * SECOND
        started = {"enqueued_at": earlier, "started_at": earlier, "lease_expires_at": lease}
        return {"attempts": 1, "worker": WORKER, **started}
    if status is JobStatus.RETRYING:
        return {"attempts": 1, "errors": [_error(1)], "next_attempt_at": now - SECOND}  # due
    if status is JobStatus.SUCCEEDED:
        return {"attempts": 1, "result": {"ok": True}, "started_at": earlier, "finished_at": now}
    if status is JobStatus.DEAD:
        errors = [_error(n) for n in range(1, MAX_ATTEMPTS + 1)]
        return {"attempts": MAX_ATTEMPTS, "errors": errors, "finished_at": now}
    return {"finished_at": now}  # cancelled


async def db_now(session: AsyncSession) -> datetime:
    now = await session.scalar(select(func.now()))
    assert isinstance(now, datetime)
    return now


async def make_job(
    session: AsyncSession, status: JobStatus = JobStatus.QUEUED, **fields: Any
) -> JobRow:
    """Insert one job in ``status`` (its own queue unless ``queue`` is given); ``fields``
    override any column."""
    now = await db_now(session)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "type": "demo.echo",
        "queue": f"q-{uuid.uuid4().hex[:10]}",
        "status": status,
        "payload": {},
        "attempts": 0,
        "max_attempts": MAX_ATTEMPTS,
        "errors": [],
        "run_at": now - 10 * SECOND,
        **_by_status(status, now),
        **fields,
    }
    if status is JobStatus.RUNNING:  # the running attempt's fencing token
        values.setdefault("claim_token", values["attempts"])
    row = JobRow(**values)
    session.add(row)
    await session.flush()
    return row


async def snapshot(session: AsyncSession, job_id: uuid.UUID) -> dict[str, Any]:
    """The row as stored now (not the ORM's cached object)."""
    result = await session.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})
    return dict(result.mappings().one())


async def events(session: AsyncSession, job_id: uuid.UUID) -> list[str]:
    result = await session.scalars(
        text("SELECT event FROM job_events WHERE job_id = :id ORDER BY id"), {"id": job_id}
    )
    return [str(e) for e in result]


async def raw_connection(session: AsyncSession) -> asyncpg.Connection:
    """The session's own asyncpg connection: the worker's statements (``app.jobs.attempts``)
    run in the test's transaction."""
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    return driver
