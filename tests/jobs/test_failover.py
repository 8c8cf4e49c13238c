"""The Postgres server's identity and the switch it reveals (``app.jobs.failover``), in one
rolled-back transaction: the first record is no switch, the same identity is none, another one
forgets every queued job's dispatch mark (and only those) and raises the floor of the claim
tokens past every token the old server may have handed out."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.jobs import attempts, failover
from app.jobs.attempts import Completion
from app.jobs.repository import Backoff
from app.jobs.status import JobStatus
from tests.jobs.factories import make_job, raw_connection


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


# What a claim the new server never received leaves behind: the row as it was before it.
_LOSE_CLAIM = """
UPDATE jobs SET status = 'queued', attempts = attempts - 1, claim_token = claim_token - 1,
    worker = NULL, started_at = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'running'
"""


async def test_after_a_switch_no_claim_hands_out_a_token_of_the_old_server(
    session: AsyncSession,
) -> None:
    """A claim only the old server saw gave its token back with the switch. The next claim
    must not hand that token out again: the lost claim's attempt may still be running, and
    its outcome would pass the fence."""
    await session.execute(
        text("DELETE FROM conveyor_state WHERE key = ANY(:k)"),
        {"k": ["postgres-identity", failover.CLAIM_FLOOR_KEY]},
    )
    job = await make_job(session, JobStatus.QUEUED)
    conn = await raw_connection(session)
    assert await failover.record_identity(session, "1:1") is None
    [lost] = await attempts.claim_many(conn, [job.id], "w1", 30.0)
    assert await conn.execute(_LOSE_CLAIM, job.id) == "UPDATE 1"

    assert await failover.record_identity(session, "1:2") is not None
    [again] = await attempts.claim_many(conn, [job.id], "w2", 30.0)
    assert again.token > lost.token
    stale = Completion(job.id, lost.token, '"stale"')
    moved, _ = await attempts.complete_many(conn, "w1", [stale], Backoff(0.0, 0.0))
    assert moved == set()  # fenced off

    # every later switch raises the floor again, past every token handed out before it
    assert await conn.execute(_LOSE_CLAIM, job.id) == "UPDATE 1"
    assert await failover.record_identity(session, "2:1") is not None  # a restored backup
    [third] = await attempts.claim_many(conn, [job.id], "w3", 30.0)
    assert third.token > again.token
