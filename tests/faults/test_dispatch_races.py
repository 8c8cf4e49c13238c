"""Deterministic races around the dispatch marker (``dispatched_at``).

The marker says "this queued job has a stream entry"; the sweep re-sends only jobs without
it. A confirmation that arrives late, after the job already ran, failed, was promoted back to
``queued`` and could not be sent again (stream full, Redis blip), must not mark the *new*
queued episode as dispatched: its entry was consumed long ago and the job would wait forever.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.engine import create_engine, create_session_factory
from app.db.url import asyncpg_dsn
from app.devserver import EmbeddedRedis
from app.jobs import attempts, marks, repository
from app.jobs.attempts import Completion
from app.jobs.dispatch import Dispatcher
from app.jobs.marks import Sent
from app.jobs.repository import Backoff, Target
from app.main import create_app
from app.settings import Settings
from app.streams.client import StreamClient
from app.streams.connection import create_redis
from app.streams.keys import DEFAULT_BAND, GROUP, Keys
from tests.conftest import CLIENT_HEADERS, Backends, make_settings
from tests.faults.checker import drain, stranded
from tests.faults.harness import (
    Supervisor,
    create_effects_table,
    epoch_recorded,
    orphan_row,
    served_before,
)
from tests.faults.scenario import wait_running
from tests.support import db
from tests.support.processes import Spawner
from workers.execution import error_record


async def test_late_confirmation_does_not_hide_a_requeued_job(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    await create_effects_table(settings.database_url)
    # A worker has served the queue before (so its next start is not a "first start", whose
    # reconcile re-sends every queued job anyway), and is stopped while the race plays out.
    workers = Supervisor(spawn, [queue], 1)
    workers.start()
    await workers.ready(settings.database_url)
    await epoch_recorded(settings, queue)
    await workers.stop()
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    stream = StreamClient(create_redis(settings), Keys(settings.redis_prefix), maxlen=100)
    dispatcher = Dispatcher(stream, sessions, settings.partitions)  # confirm loop not started
    try:
        async with sessions.begin() as session:
            [job] = await repository.insert_jobs(session, [orphan_row(queue, uuid.uuid4().hex)])
        target = Target(job.id, job.queue, job.priority)
        await dispatcher.send_after_commit([target])  # XADDed; the confirmation is pending
        await asyncio.sleep(0.1)
        # Meanwhile a worker takes the entry, the attempt fails, the retry is promoted back to
        # queued, and its new XADD does not happen (the stream is full or Redis blinked).
        conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
        try:
            [claim] = await attempts.claim_many(conn, [job.id], "w-elsewhere", 30.0)
            error = error_record(1, "w-elsewhere", "boom", "RuntimeError")
            failure = Completion(job.id, claim.token, None, error)
            await attempts.complete_many(conn, "w-elsewhere", [failure], Backoff(0.0, 0.0))
        finally:
            await conn.close()
        async with sessions.begin() as session:
            assert [t.id for t in await repository.promote_due(session, [queue])] == [job.id]
        async with Redis.from_url(settings.redis_url) as redis:
            await redis.delete(dispatcher.stream_of(target))  # the first entry was consumed
        await dispatcher.stop()  # the late confirmation arrives now
    finally:
        await stream.close()
        await engine.dispose()
    marker = await db.fetchval(
        settings.database_url, "SELECT dispatched_at FROM jobs WHERE id = $1", job.id
    )
    assert marker is None, "a stale confirmation marked the re-queued job as dispatched"
    workers = Supervisor(spawn, [queue], 1)
    workers.start()
    await drain(settings.database_url, queue, timeout=20.0)
    status = await db.fetchval(
        settings.database_url, "SELECT status FROM jobs WHERE id = $1", job.id
    )
    await workers.stop()
    assert status == "succeeded"


async def test_confirmation_marks_a_fresh_submission(
    client: httpx.AsyncClient, settings: Settings, queue: str
) -> None:
    """The API's batched confirmation does mark jobs it sent (no needless re-send later)."""
    response = await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})
    assert response.status_code == 202
    job_id = uuid.UUID(response.json()["id"])
    marked = "SELECT dispatched_at IS NOT NULL FROM jobs WHERE id = $1"
    await db.wait_for_value(settings.database_url, marked, job_id, expected=True, timeout=10.0)


async def test_confirmation_of_an_entry_lost_with_redis_is_refused(
    spawn: Spawner, settings: Settings, fault_redis: EmbeddedRedis, queue: str
) -> None:
    """XADD, then Redis loses everything, a worker detects it (records the new data epoch,
    forgets the queue's dispatch markers) and only then the API's confirmation of that XADD
    arrives: it must not mark the job, whose entry is gone, or the job waits forever."""
    await create_effects_table(settings.database_url)
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    stream = StreamClient(create_redis(settings), Keys(settings.redis_prefix), maxlen=100)
    dispatcher = Dispatcher(stream, sessions, settings.partitions)  # confirm loop not started
    try:
        async with sessions.begin() as session:
            [job] = await repository.insert_jobs(session, [orphan_row(queue, uuid.uuid4().hex)])
        await dispatcher.send_after_commit([Target(job.id, job.queue, job.priority)])
        await asyncio.sleep(0.1)
        async with Redis.from_url(settings.redis_url) as redis:
            await redis.flushall()
        # What a worker's reconcile does on seeing the loss (its sweep would follow).
        [epoch] = await stream.epochs([(queue, 0)])
        async with sessions.begin() as session:
            key = marks.epoch_key(settings.redis_prefix, queue, 0)
            assert await marks.record_epoch(session, key, epoch)
            await marks.forget_dispatches(session, [queue])
        await dispatcher.stop()  # the late confirmation
    finally:
        await stream.close()
        await engine.dispose()
    workers = Supervisor(spawn, [queue], 1)  # sees the epoch it recorded: no loss to repair
    workers.start()
    await drain(settings.database_url, queue, timeout=20.0)
    status = await db.fetchval(
        settings.database_url, "SELECT status FROM jobs WHERE id = $1", job.id
    )
    await workers.stop()
    assert status == "succeeded"


async def test_shutdown_with_a_full_stream_strands_no_job(
    backends: Backends, queue: str, tmp_path: Path
) -> None:
    """A worker stops while entries delivered to it wait unclaimed and the stream is at its
    bound: the entries it hands back cannot be sent again at once, so the jobs must be left
    for the sweep (unmarked), never marked dispatched with their only entry deleted."""
    settings = make_settings(backends, stream_maxlen=100, shutdown_grace_seconds=0.5)
    spawn = Spawner(settings, tmp_path)
    try:
        await served_before(spawn, settings, queue)
        await _strand_on_shutdown(spawn, settings, queue)
    finally:
        spawn.stop_all()
    assert await stranded(settings, queue) == {}


async def _strand_on_shutdown(spawn: Spawner, settings: Settings, queue: str) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):  # 120 naps: 100 in the stream, 20 waiting
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as http:
            nap = {"type": "test.nap", "queue": queue, "payload": {"seconds": 30.0}}
            response = await http.post("/v1/jobs/batch", json={"jobs": [nap] * 120})
            assert response.status_code == 202
    workers = Supervisor(spawn, [queue], 1, concurrency=1)
    workers.start()
    await wait_running(settings.database_url, queue, 1)
    stream = Keys(settings.redis_prefix).stream(queue, 0, DEFAULT_BAND)
    async with Redis.from_url(settings.redis_url) as redis:  # delivered to it, unclaimed
        await redis.xreadgroup(GROUP, workers.names[0], {stream: ">"}, count=5)
        assert await redis.xlen(stream) == 100
    await workers.stop()


async def test_loss_record_waits_for_a_confirmation_in_flight(
    settings: Settings, queue: str
) -> None:
    """A sweep sent a job and marked it, uncommitted, when a worker records a Redis data loss:
    the record waits for the sweep's commit, so the re-dispatch that follows clears the mark
    (the entry may have been lost) instead of missing it."""
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    key = marks.epoch_key(settings.redis_prefix, queue, 0)
    try:
        async with sessions.begin() as session:
            await marks.record_epoch(session, key, "before")
            [job] = await repository.insert_jobs(session, [orphan_row(queue, uuid.uuid4().hex)])
        async with sessions() as sweep, sweep.begin():
            [target] = await marks.lock_undispatched(sweep, [job.id])
            assert target.id == job.id
            # (the XADD happens here, and Redis loses it)
            await marks.confirm_dispatched(sweep, [Sent(job.id, 0.0, "1-0")], settings.redis_prefix)
            loss = asyncio.create_task(_record_loss(sessions, key, queue))
            await asyncio.sleep(0.5)
            assert not loss.done(), "the loss was recorded past a confirmation in flight"
        await loss
        assert await _marker(sessions, job.id) is None
    finally:
        await engine.dispose()


async def test_confirmation_waits_for_a_loss_record_in_flight(
    settings: Settings, queue: str
) -> None:
    """A worker is recording a Redis data loss (its re-dispatch already ran, uncommitted) when
    a late confirmation of an XADD sent before the loss arrives: it waits for the record, sees
    it, and leaves the job unmarked for the sweep (its entry is gone)."""
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    key = marks.epoch_key(settings.redis_prefix, queue, 0)
    try:
        async with sessions.begin() as session:
            await marks.record_epoch(session, key, "before")
            [job] = await repository.insert_jobs(session, [orphan_row(queue, uuid.uuid4().hex)])
        await asyncio.sleep(1.0)  # the XADD happened a second ago
        async with sessions() as reconcile, reconcile.begin():
            assert await marks.record_epoch(reconcile, key, "after")
            await marks.forget_dispatches(reconcile, [queue])

            async def confirm() -> None:
                async with sessions.begin() as session:
                    await marks.confirm_dispatched(
                        session, [Sent(job.id, 1.0, "1-0")], settings.redis_prefix
                    )

            late = asyncio.create_task(confirm())
            await asyncio.sleep(0.5)
            assert not late.done(), "the confirmation did not wait for the loss record"
        await late
        assert await _marker(sessions, job.id) is None
    finally:
        await engine.dispose()


async def _record_loss(sessions: async_sessionmaker[AsyncSession], key: str, queue: str) -> None:
    """What a worker's reconcile does on seeing a new data epoch."""
    async with sessions.begin() as session:
        assert await marks.record_epoch(session, key, "after")
        await marks.forget_dispatches(session, [queue])


async def _marker(sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID) -> Any:
    async with sessions() as session:
        query = text("SELECT dispatched_at FROM jobs WHERE id = :id")
        return (await session.execute(query, {"id": job_id})).scalar_one()
