"""The status machine has one definition (``app/jobs/status.py``): the migrated database's
constraints and the ORM column agree with it."""

from __future__ import annotations

import re

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs.status import TERMINAL, JobStatus
from tests.jobs.factories import make_job


async def _constraint(session: AsyncSession, name: str) -> set[str]:
    definition = await session.scalar(
        text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :name"),
        {"name": name},
    )
    return set(re.findall(r"'(\w+)'::text", str(definition)))


async def test_the_migrated_constraints_list_the_enum(session: AsyncSession) -> None:
    assert await _constraint(session, "ck_jobs_status_valid") == {s.value for s in JobStatus}
    assert await _constraint(session, "ck_jobs_finished_iff_terminal") == {
        s.value for s in TERMINAL
    }


async def test_the_orm_reads_the_status_as_the_enum(session: AsyncSession) -> None:
    job = await make_job(session, JobStatus.RETRYING)
    session.expunge_all()
    stored = await session.scalar(text("SELECT status FROM jobs WHERE id = :id"), {"id": job.id})
    assert stored == "retrying"  # stored as text
    loaded = await session.get(JobRow, job.id)
    assert loaded is not None and loaded.status is JobStatus.RETRYING
