"""Schedules declared in code: validated at import, synced without duplicates, precedence."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.engine import create_engine, create_session_factory
from app.db.models import ScheduleRow
from app.jobs.registry import REGISTRY, JobContext, JobType, Registry, job_type
from app.schedules import repository
from app.schedules.declared import sync_declared
from app.schedules.spec import Periodic
from app.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


class Report(BaseModel):
    kind: str = "daily"


async def report(payload: Report, ctx: JobContext) -> None:
    return None


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[Sessions]:
    engine = create_engine(settings)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


def registry_with(name: str, spec: Periodic) -> Registry:
    """A registry of its own (the process-wide one stays as it is)."""
    registry = Registry()
    registry.register(JobType(name, Report, report, None, "", schedule=spec))
    return registry


async def read(sessions: Sessions, name: str) -> ScheduleRow:
    async with sessions() as session:
        row = await repository.get(session, name)
    assert row is not None
    return row


async def count(sessions: Sessions, name: str) -> int:
    async with sessions() as session:
        n = await session.scalar(
            text("SELECT count(*) FROM schedules WHERE name = :n"), {"n": name}
        )
    return int(n or 0)


async def test_synced_once_however_many_workers_start(sessions: Sessions, queue: str) -> None:
    name = f"t.{uuid.uuid4().hex[:8]}"
    registry = registry_with(name, Periodic("*/5 * * * *", queue=queue))
    written = await asyncio.gather(*[sync_declared(sessions, registry) for _ in range(4)])
    assert sum(written) == 1
    first = await read(sessions, name)
    assert (first.source, first.cron, first.queue, first.type) == (
        "code",
        "*/5 * * * *",
        queue,
        name,
    )
    assert first.payload == {"kind": "daily"}  # the model's defaults, as a job would get them
    assert first.enabled and first.next_run_at is not None

    assert await sync_declared(sessions, registry) == 0  # a restart changes nothing
    again = await read(sessions, name)
    assert again.updated_at == first.updated_at and again.next_run_at == first.next_run_at
    assert await count(sessions, name) == 1


async def test_http_edits_stay_until_the_code_changes(sessions: Sessions, queue: str) -> None:
    name = f"t.{uuid.uuid4().hex[:8]}"
    await sync_declared(sessions, registry_with(name, Periodic("*/5 * * * *", queue=queue)))
    async with sessions.begin() as session:  # what PATCH and pause over HTTP write
        await repository.change(
            session, name, {"priority": 7, "enabled": False, "next_run_at": None}
        )
    assert (
        await sync_declared(sessions, registry_with(name, Periodic("*/5 * * * *", queue=queue)))
        == 0
    )
    kept = await read(sessions, name)
    assert (kept.priority, kept.enabled) == (7, False)

    changed = Periodic("@every 1h", queue=queue, payload={"kind": "weekly"})
    assert await sync_declared(sessions, registry_with(name, changed)) == 1
    row = await read(sessions, name)
    assert (row.cron, row.payload, row.priority) == ("@every 1h", {"kind": "weekly"}, 0)
    assert row.enabled is False and row.next_run_at is None  # still paused


async def test_a_deleted_declared_schedule_comes_back(sessions: Sessions, queue: str) -> None:
    name = f"t.{uuid.uuid4().hex[:8]}"
    registry = registry_with(name, Periodic("@daily", queue=queue))
    await sync_declared(sessions, registry)
    async with sessions.begin() as session:
        assert await repository.remove(session, name)
    assert await sync_declared(sessions, registry) == 1
    assert await count(sessions, name) == 1


def test_the_decorator_checks_the_declaration_at_import() -> None:
    base = f"t.{uuid.uuid4().hex[:8]}"

    with pytest.raises(ValueError, match="cron"):
        job_type(f"{base}.a", schedule="every minute")(report)
    with pytest.raises(ValueError, match="time zone"):
        job_type(f"{base}.b", schedule=Periodic("@hourly", timezone="Nowhere/Here"))(report)
    with pytest.raises(ValueError, match="schema"):
        job_type(f"{base}.c", schedule=Periodic("@hourly", payload={"kind": 5}))(report)
    with pytest.raises(ValueError, match="queue"):
        job_type(f"{base}.d", schedule=Periodic("@hourly", queue="no spaces"))(report)
    assert all(REGISTRY.find(f"{base}.{x}") is None for x in "abcd")
