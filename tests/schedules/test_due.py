"""The due check against real Postgres and Redis: one job per slot, missed slots, dispatch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.engine import create_engine, create_session_factory
from app.db.models import ScheduleRow
from app.db.url import asyncpg_dsn as dsn
from app.jobs import marks
from app.jobs import repository as jobs_repository
from app.jobs.dispatch import Dispatcher
from app.jobs.registry import Registry
from app.schedules import repository
from app.schedules.due import ScheduleDuty, make_due_jobs, plan
from app.settings import Settings
from app.streams.client import StreamClient
from app.streams.connection import create_redis
from app.streams.keys import Keys
from tests.conftest import Backends, make_settings

Sessions = async_sessionmaker[AsyncSession]
GRACE = timedelta(seconds=60)


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[Sessions]:
    engine = create_engine(settings)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


def row(cron: str, next_run_at: datetime, missed: str = "skip") -> ScheduleRow:
    return ScheduleRow(
        name="x", cron=cron, timezone="UTC", type="demo.echo", payload={}, queue="q",
        priority=0, enabled=True, missed=missed, next_run_at=next_run_at,
    )  # fmt: skip


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


# -- the plan: pure ------------------------------------------------------------------------------


def test_on_time_slot_runs_and_the_next_is_after_now() -> None:
    now = utc(2025, 1, 1, 0, 0, 5, 200000)
    p = plan(row("@every 1s", utc(2025, 1, 1, 0, 0, 5)), now, GRACE)
    assert p.slots == [utc(2025, 1, 1, 0, 0, 5)]
    assert p.next_run_at == utc(2025, 1, 1, 0, 0, 6)


def test_late_slots_within_the_grace_each_run() -> None:
    now = utc(2025, 1, 1, 0, 0, 10, 500000)
    p = plan(row("@every 1s", utc(2025, 1, 1, 0, 0, 3)), now, GRACE)
    assert p.slots == [utc(2025, 1, 1, 0, 0, s) for s in range(3, 11)]
    assert p.next_run_at == utc(2025, 1, 1, 0, 0, 11)


def test_skip_drops_the_missed_slots() -> None:
    # down from before 09:00 until 12:02: every slot up to 12:00 is over 60 s late
    p = plan(row("*/5 * * * *", utc(2025, 1, 1, 9, 0)), utc(2025, 1, 1, 12, 2), GRACE)
    assert p.slots == []
    assert p.next_run_at == utc(2025, 1, 1, 12, 5)


def test_skip_keeps_a_slot_that_is_late_but_within_the_grace() -> None:
    p = plan(row("*/5 * * * *", utc(2025, 1, 1, 9, 0)), utc(2025, 1, 1, 12, 0, 30), GRACE)
    assert p.slots == [utc(2025, 1, 1, 12, 0)]
    assert p.next_run_at == utc(2025, 1, 1, 12, 5)


def test_run_once_makes_one_job_for_the_missed_slots() -> None:
    p = plan(row("*/5 * * * *", utc(2025, 1, 1, 9, 0), "run_once"), utc(2025, 1, 1, 12, 2), GRACE)
    assert p.slots == [utc(2025, 1, 1, 9, 0)]
    assert p.next_run_at == utc(2025, 1, 1, 12, 5)
    # with late slots within the grace too: one for the missed ones, then each late one
    late = plan(
        row("@every 1s", utc(2025, 1, 1, 0, 0, 0), "run_once"),
        utc(2025, 1, 1, 0, 10, 0, 500000),
        timedelta(seconds=3),
    )
    assert late.slots == [utc(2025, 1, 1, 0, 0, 0)] + [
        utc(2025, 1, 1, 0, 9, s) for s in range(58, 60)
    ] + [utc(2025, 1, 1, 0, 10, 0)]


# -- against Postgres ----------------------------------------------------------------------------


async def add_schedule(
    sessions: Sessions, queue: str, cron: str, behind: float, missed: str = "skip"
) -> tuple[str, datetime]:
    """A schedule whose next slot is ``behind`` seconds before the Postgres clock (on a
    whole second); returns its name and that slot."""
    name = f"due-{uuid.uuid4().hex[:10]}"
    async with sessions.begin() as session:
        start = await session.scalar(
            text("SELECT date_trunc('second', now() - make_interval(secs => :b))"), {"b": behind}
        )
        await repository.insert(
            session,
            {
                "name": name, "cron": cron, "timezone": "UTC", "type": "demo.echo",
                "payload": {"s": name}, "queue": queue, "priority": 0, "enabled": True,
                "missed": missed, "next_run_at": start,
            },
        )  # fmt: skip
    assert isinstance(start, datetime)
    return name, start


async def slots_of(sessions: Sessions, name: str) -> list[datetime]:
    async with sessions() as session:
        result = await session.scalars(
            text("SELECT scheduled_for FROM jobs WHERE schedule = :n ORDER BY scheduled_for"),
            {"n": name},
        )
        return list(result.all())


async def due_check(sessions: Sessions, queue: str, grace: timedelta = GRACE) -> int:
    async with sessions.begin() as session:
        _, made = await make_due_jobs(session, [queue], grace)
    return len(made)


async def test_parallel_due_checks_make_each_slot_once(sessions: Sessions, queue: str) -> None:
    name, start = await add_schedule(sessions, queue, "@every 1s", behind=20)
    made = await asyncio.gather(*[due_check(sessions, queue) for _ in range(8)])
    slots = await slots_of(sessions, name)
    assert sum(made) == len(slots) >= 20
    assert slots == [start + timedelta(seconds=i) for i in range(len(slots))]  # no gap
    async with sessions() as session:
        schedule = await repository.get(session, name)
    assert schedule is not None and schedule.next_run_at is not None
    assert schedule.last_run_at == slots[-1]
    assert schedule.next_run_at == slots[-1] + timedelta(seconds=1)


async def test_a_slot_that_has_its_job_is_never_made_again(sessions: Sessions, queue: str) -> None:
    name, start = await add_schedule(sessions, queue, "@every 1s", behind=5)
    await due_check(sessions, queue)
    before = await slots_of(sessions, name)
    # as if the schedule's row went back (a restored backup, a bad edit): the key holds
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE schedules SET next_run_at = :s WHERE name = :n"), {"s": start, "n": name}
        )
    await due_check(sessions, queue)
    after = await slots_of(sessions, name)
    assert after[: len(before)] == before
    assert len(after) == len(set(after))


async def test_skip_after_downtime_makes_only_slots_within_the_grace(
    sessions: Sessions, queue: str
) -> None:
    name, _ = await add_schedule(sessions, queue, "@every 1s", behind=100)
    await due_check(sessions, queue, grace=timedelta(seconds=2))
    slots = await slots_of(sessions, name)
    async with sessions() as session:
        now = await repository.db_now(session)
    assert 1 <= len(slots) <= 4
    assert all(s >= now - timedelta(seconds=4) for s in slots)


async def test_run_once_after_downtime_makes_one_job_for_the_missed(
    sessions: Sessions, queue: str
) -> None:
    name, start = await add_schedule(sessions, queue, "@every 1s", behind=100, missed="run_once")
    await due_check(sessions, queue, grace=timedelta(seconds=2))
    slots = await slots_of(sessions, name)
    assert slots[0] == start  # the one job for the missed slots
    assert slots[1] > start + timedelta(seconds=90)  # then only the recent ones
    assert 2 <= len(slots) <= 5


async def test_paused_and_other_queues_are_left_alone(sessions: Sessions, queue: str) -> None:
    name, _ = await add_schedule(sessions, queue, "@every 1s", behind=3)
    async with sessions.begin() as session:
        await repository.change(session, name, {"enabled": False, "next_run_at": None})
    assert await due_check(sessions, queue) == 0
    other, _ = await add_schedule(sessions, f"{queue}-other", "@every 1s", behind=3)
    assert await due_check(sessions, queue) == 0
    assert await slots_of(sessions, other) == []


def duty(settings: Settings, sessions: Sessions, queue: str) -> tuple[ScheduleDuty, StreamClient]:
    stream = StreamClient(
        create_redis(settings), Keys(settings.redis_prefix), maxlen=settings.stream_maxlen
    )
    dispatcher = Dispatcher(stream, sessions, settings.partitions)
    return ScheduleDuty(sessions, dispatcher, Registry(), [queue], settings), stream


async def test_made_jobs_are_sent_to_their_stream(
    settings: Settings, sessions: Sessions, queue: str
) -> None:
    name, _ = await add_schedule(sessions, queue, "@every 1s", behind=2)
    schedules, stream = duty(settings, sessions, queue)
    try:
        await schedules.run_schedules()
        async with sessions() as session:
            rows = (
                await session.execute(
                    text("SELECT status, dispatched_at FROM jobs WHERE schedule = :n"), {"n": name}
                )
            ).all()
        assert len(rows) >= 2
        assert all(r.status == "queued" and r.dispatched_at is not None for r in rows)
        lengths = [await stream.redis.xlen(s) for s in stream.keys.partition_streams(queue, 0)]
        assert sum(lengths) == len(rows)
    finally:
        await stream.close()


async def test_a_send_that_fails_after_the_commit_is_left_to_the_sweep(
    backends: Backends, sessions: Sessions, queue: str
) -> None:
    broken = make_settings(backends, redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    name, _ = await add_schedule(sessions, queue, "@every 1s", behind=2)
    schedules, stream = duty(broken, sessions, queue)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever Redis's client raises
            await schedules.run_schedules()
    finally:
        await stream.close()
    made = await slots_of(sessions, name)
    assert len(made) >= 2  # committed before the send
    async with sessions() as session:  # what the undispatched sweep finds
        bands = await marks.undispatched_bands(session, [queue], 0.0)
        swept = [
            job
            for q, band in bands
            for job in await marks.undispatched_page(session, q, band, 0.0, marks.FIRST, 100)
        ]
    assert len(swept) == len(made)


async def test_a_schedule_that_cannot_be_computed_is_paused(sessions: Sessions, queue: str) -> None:
    name, _ = await add_schedule(sessions, queue, "@every 1s", behind=2)
    async with sessions.begin() as session:  # as if the tz database lost the zone
        await session.execute(
            text("UPDATE schedules SET timezone = 'Gone/Zone' WHERE name = :n"), {"n": name}
        )
    assert await due_check(sessions, queue) == 0
    async with sessions() as session:
        row = await repository.get(session, name)
    assert row is not None and row.enabled is False and row.next_run_at is None
    assert await due_check(sessions, queue) == 0


async def test_the_idle_probe_sees_a_due_slot_exactly_when_the_due_check_would(
    settings: Settings, sessions: Sessions, queue: str
) -> None:
    """The worker skips the due check while ``due_work(...).slots`` says no: it must say yes
    whenever the check would make a job, and no for a later slot, another queue or a paused
    schedule."""
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        assert not (await jobs_repository.due_work(conn, [queue])).slots
        later, _ = await add_schedule(sessions, queue, "@every 1h", behind=-3600)
        assert not (await jobs_repository.due_work(conn, [queue])).slots
        name, _ = await add_schedule(sessions, queue, "@every 1s", behind=2)
        assert (await jobs_repository.due_work(conn, [queue])).slots
        assert (await jobs_repository.due_work(conn, ["elsewhere", queue])).slots
        assert not (await jobs_repository.due_work(conn, [f"{queue}-other"])).slots
        async with sessions.begin() as session:
            await repository.change(session, name, {"enabled": False, "next_run_at": None})
        assert not (await jobs_repository.due_work(conn, [queue])).slots
        assert await due_check(sessions, queue) == 0
        assert await slots_of(sessions, later) == []
    finally:
        await conn.close()
