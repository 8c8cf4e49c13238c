"""The Postgres server's identity and the switch it reveals (``app.jobs.failover``), in one
rolled-back transaction: the first record is no switch, the same identity is none, another one
forgets every queued job's dispatch mark (and only those)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.jobs import failover
from app.jobs.status import JobStatus
from tests.jobs.factories import make_job


async def test_the_identity_names_the_system_and_its_timeline(session: AsyncSession) -> None:
    identity = await failover.server_identity(session)
    system = await session.scalar(text("SELECT system_identifier::text FROM pg_control_system()"))
    assert identity is not None
    found_system, timeline = identity.split(":")
    assert found_system == system
    assert int(timeline) >= 1


async def test_a_new_identity_forgets_every_dispatch_mark(session: AsyncSession) -> None:
    await session.execute(
        text("DELETE FROM conveyor_state WHERE key = :k"), {"k": "postgres-identity"}
    )
    marked = datetime.now(UTC)
    queued = await make_job(session, JobStatus.QUEUED, dispatched_at=marked)
    unmarked = await make_job(session, JobStatus.QUEUED)
    running = await make_job(
        session, JobStatus.RUNNING, attempts=1, started_at=marked, dispatched_at=marked
    )

    assert await failover.record_identity(session, "1:1") is None  # the first record
    assert await failover.record_identity(session, "1:1") is None  # the same server
    switch = await failover.record_identity(session, "1:2")  # promoted: the next timeline
    assert switch is not None and (switch.before, switch.after) == ("1:1", "1:2")
    assert switch.forgotten >= 1

    rows = await session.execute(
        text("SELECT id, dispatched_at FROM jobs WHERE id = ANY(:ids)"),
        {"ids": [queued.id, unmarked.id, running.id]},
    )
    marks = {r.id: r.dispatched_at for r in rows}
    assert marks[queued.id] is None and marks[unmarked.id] is None
    assert marks[running.id] is not None  # a running job keeps its mark: no entry is needed
    assert await failover.record_identity(session, "1:2") is None
