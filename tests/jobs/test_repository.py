"""Conformance of every transition in ``app/jobs/repository.py``, from every starting status.

In the manner of River's driver tests (``riverdriver/riverdrivertest``): the table names, for
each transition, the starting statuses it moves and where to; every other status must be
refused, with the row and its history left exactly as they were. Then the fences: a running
job refuses the writes of another worker and of a stale attempt.

Each transition is called through a one-line adapter below, so that a change of signature is
a one-line change here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs import attempts, repository
from app.jobs.attempts import Completion, ErrorRecord
from app.jobs.repository import Backoff
from app.jobs.status import TERMINAL, JobStatus
from tests.jobs.factories import (
    MAX_ATTEMPTS,
    SECOND,
    WORKER,
    db_now,
    events,
    make_job,
    raw_connection,
    snapshot,
)

S = JobStatus
LEASE_SECONDS = 60.0
BACKOFF = Backoff(1.0, 10.0)
ACTOR = "operator"
OTHER_WORKER = "w-other"
Row = dict[str, Any]


# -- adapters: one call each; True when the transition reports the job moved ------------------


async def claim(s: AsyncSession, job: JobRow, worker: str = WORKER) -> bool:
    return bool(await attempts.claim_many(await raw_connection(s), [job.id], worker, LEASE_SECONDS))


async def _complete(s: AsyncSession, worker: str, outcome: Completion) -> bool:
    moved, _ = await attempts.complete_many(await raw_connection(s), worker, [outcome], BACKOFF)
    return bool(moved)


async def succeed(s: AsyncSession, job: JobRow, worker: str = WORKER, attempt: int = 0) -> bool:
    outcome = Completion(job.id, attempt or job.claim_token, json.dumps({"answer": 42}))
    return await _complete(s, worker, outcome)


async def fail(
    s: AsyncSession, job: JobRow, worker: str = WORKER, attempt: int = 0, permanent: bool = False
) -> bool:
    error = ErrorRecord(
        attempt=job.attempts, error="boom", type="RuntimeError", traceback=None, worker=worker
    )
    outcome = Completion(job.id, attempt or job.claim_token, None, error, permanent)
    return await _complete(s, worker, outcome)


async def fail_permanently(s: AsyncSession, job: JobRow) -> bool:
    return await fail(s, job, permanent=True)


async def extend_lease(
    s: AsyncSession, job: JobRow, worker: str = WORKER, attempt: int = 0
) -> bool:
    running = [(job.id, attempt or job.claim_token)]
    leases = await attempts.extend_leases(await raw_connection(s), worker, running, LEASE_SECONDS)
    return bool(leases.held)


async def release(s: AsyncSession, job: JobRow, worker: str = WORKER, attempt: int = 0) -> bool:
    running = [(job.id, attempt or job.claim_token)]
    return bool(await attempts.release_many(await raw_connection(s), worker, running))


async def reclaim(s: AsyncSession, job: JobRow) -> bool:
    conn = await raw_connection(s)
    return bool(await attempts.reclaim_expired(conn, ACTOR, BACKOFF, [job.queue], ids=[job.id]))


async def promote(s: AsyncSession, job: JobRow) -> bool:
    return bool(await repository.promote_due(s, [job.queue]))


async def cancel(s: AsyncSession, job: JobRow) -> bool:
    return await repository.cancel(s, job.id, ACTOR) is not None


async def replay(s: AsyncSession, job: JobRow) -> bool:
    return bool(await repository.replay(s, ACTOR, ids=[job.id]))


async def remove_from_dlq(s: AsyncSession, job: JobRow) -> bool:
    return await repository.remove_from_dlq(s, job.id, ACTOR)


# -- what an accepted move writes, beyond the status ------------------------------------------


def claimed(before: Row, after: Row) -> None:
    assert after["attempts"] == before["attempts"] + 1
    assert after["worker"] == WORKER and after["started_at"] is not None
    assert after["lease_expires_at"] is not None and after["next_attempt_at"] is None


def succeeded(before: Row, after: Row) -> None:
    assert after["result"] == {"answer": 42} and after["finished_at"] is not None
    assert after["worker"] is None and after["lease_expires_at"] is None


def failed(before: Row, after: Row) -> None:
    assert len(after["errors"]) == len(before["errors"]) + 1
    assert after["errors"][-1]["error"] == "boom" and "at" in after["errors"][-1]
    assert after["worker"] is None and after["lease_expires_at"] is None
    assert after["attempts"] == before["attempts"]
    if after["status"] == S.RETRYING:
        assert after["next_attempt_at"] is not None and after["finished_at"] is None
    else:
        assert after["next_attempt_at"] is None and after["finished_at"] is not None


def lease_extended(before: Row, after: Row) -> None:
    assert after["lease_expires_at"] > before["lease_expires_at"]
    assert {k: v for k, v in after.items() if k != "lease_expires_at"} == {
        k: v for k, v in before.items() if k != "lease_expires_at"
    }


def released(before: Row, after: Row) -> None:
    assert after["attempts"] == before["attempts"] - 1  # the interrupted attempt does not count
    assert after["worker"] is None and after["lease_expires_at"] is None
    assert after["started_at"] is None and after["dispatched_at"] is None
    assert after["errors"] == before["errors"]


def reclaimed(before: Row, after: Row) -> None:
    assert after["attempts"] == before["attempts"]
    assert after["errors"][-1]["error"] == "worker lost"
    assert after["errors"][-1]["worker"] == WORKER
    assert after["worker"] is None and after["next_attempt_at"] is not None


def promoted(before: Row, after: Row) -> None:
    assert after["enqueued_at"] is not None and after["dispatched_at"] is None
    assert after["attempts"] == before["attempts"]


def cancelled(before: Row, after: Row) -> None:
    assert after["finished_at"] is not None and after["next_attempt_at"] is None


def replayed(before: Row, after: Row) -> None:
    assert after["attempts"] == 0 and after["errors"] == before["errors"]  # history kept
    assert after["finished_at"] is None and after["dispatched_at"] is None
    assert after["enqueued_at"] is not None


def removed(before: Row, after: Row) -> None:
    assert after["dlq_removed_at"] is not None
    assert {k: v for k, v in after.items() if k != "dlq_removed_at"} == {
        k: v for k, v in before.items() if k != "dlq_removed_at"
    }


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    act: Callable[[AsyncSession, JobRow], Awaitable[bool]]
    moves: Mapping[JobStatus, JobStatus]  # from → to; every other status is refused
    event: str | None  # the job_events row an accepted move appends
    check: Callable[[Row, Row], None]
    fields: Callable[[datetime], Row] = field(default=lambda now: {})  # the starting row's


def _last_attempt(now: datetime) -> Row:
    return {"attempts": MAX_ATTEMPTS}


def _lapsed_lease(now: datetime) -> Row:
    return {"lease_expires_at": now - SECOND}


TRANSITIONS: dict[str, Transition] = {
    "claim": Transition(claim, {S.QUEUED: S.RUNNING}, "claimed", claimed),
    "succeed": Transition(succeed, {S.RUNNING: S.SUCCEEDED}, "succeeded", succeeded),
    "fail": Transition(fail, {S.RUNNING: S.RETRYING}, "failed", failed),
    "fail_last_attempt": Transition(fail, {S.RUNNING: S.DEAD}, "dead", failed, _last_attempt),
    "fail_permanently": Transition(fail_permanently, {S.RUNNING: S.DEAD}, "dead", failed),
    "extend_lease": Transition(extend_lease, {S.RUNNING: S.RUNNING}, None, lease_extended),
    "release": Transition(release, {S.RUNNING: S.QUEUED}, "released", released),
    "reclaim": Transition(reclaim, {S.RUNNING: S.RETRYING}, "reclaimed", reclaimed, _lapsed_lease),
    "promote": Transition(
        promote, {S.SCHEDULED: S.QUEUED, S.RETRYING: S.QUEUED}, "promoted", promoted
    ),
    "cancel": Transition(
        cancel,
        {S.QUEUED: S.CANCELLED, S.SCHEDULED: S.CANCELLED, S.RETRYING: S.CANCELLED},
        "cancelled",
        cancelled,
    ),
    "replay": Transition(replay, {S.DEAD: S.QUEUED}, "replayed", replayed),
    "remove_from_dlq": Transition(remove_from_dlq, {S.DEAD: S.DEAD}, "dlq_removed", removed),
}


@pytest.mark.parametrize("start", list(JobStatus), ids=str)
@pytest.mark.parametrize("name", list(TRANSITIONS))
async def test_transition_from_every_status(
    session: AsyncSession, name: str, start: JobStatus
) -> None:
    transition = TRANSITIONS[name]
    now = await db_now(session)
    job = await make_job(session, start, **transition.fields(now))
    before, history = await snapshot(session, job.id), await events(session, job.id)

    moved = await transition.act(session, job)

    after = await snapshot(session, job.id)
    if start not in transition.moves:
        assert not moved, f"{name} moved a {start} job"
        assert after == before
        assert await events(session, job.id) == history
        return
    assert moved, f"{name} refused a {start} job"
    assert after["status"] == transition.moves[start]
    assert (after["finished_at"] is not None) == (after["status"] in TERMINAL)
    transition.check(before, after)
    expected = [*history, transition.event] if transition.event else history
    assert await events(session, job.id) == expected


def test_the_table_covers_every_transition_of_the_diagram() -> None:
    """Every arrow of the status machine (docs/architecture.md) is in the table."""
    arrows = {(a, b) for t in TRANSITIONS.values() for a, b in t.moves.items() if a != b}
    assert arrows == {
        (S.QUEUED, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
        (S.RUNNING, S.RETRYING),
        (S.RUNNING, S.DEAD),
        (S.RUNNING, S.QUEUED),
        (S.SCHEDULED, S.QUEUED),
        (S.RETRYING, S.QUEUED),
        (S.QUEUED, S.CANCELLED),
        (S.SCHEDULED, S.CANCELLED),
        (S.RETRYING, S.CANCELLED),
        (S.DEAD, S.QUEUED),
    }


# -- fences: a running job refuses writes that are not its current attempt's ------------------

WorkerWrite = Callable[..., Awaitable[bool]]
WORKER_WRITES: dict[str, WorkerWrite] = {
    "succeed": succeed,
    "fail": fail,
    "extend_lease": extend_lease,
    "release": release,
}


@pytest.mark.parametrize("name", list(WORKER_WRITES))
@pytest.mark.parametrize("who", ["other_worker", "stale_attempt"])
async def test_running_job_refuses_a_write_that_is_not_its_attempts(
    session: AsyncSession, name: str, who: str
) -> None:
    job = await make_job(session, S.RUNNING, attempts=2)
    before = await snapshot(session, job.id)
    fence = {"worker": OTHER_WORKER} if who == "other_worker" else {"attempt": 1}
    assert not await WORKER_WRITES[name](session, job, **fence)
    assert await snapshot(session, job.id) == before


async def test_claim_twice_moves_once(session: AsyncSession) -> None:
    job = await make_job(session, S.QUEUED)
    assert await claim(session, job)
    assert not await claim(session, job, OTHER_WORKER)
    assert (await snapshot(session, job.id))["worker"] == WORKER


@pytest.mark.parametrize("start", [S.SCHEDULED, S.RETRYING])
async def test_promote_refuses_what_is_not_due(session: AsyncSession, start: JobStatus) -> None:
    now = await db_now(session)
    not_yet = {"run_at" if start is S.SCHEDULED else "next_attempt_at": now + SECOND}
    job = await make_job(session, start, **not_yet)
    assert not await promote(session, job)
    assert (await snapshot(session, job.id))["status"] == start


@pytest.mark.parametrize("start", [S.SCHEDULED, S.RETRYING])
async def test_the_idle_probe_sees_a_due_job_exactly_when_promote_would(
    session: AsyncSession, start: JobStatus
) -> None:
    """The worker skips the promotion while ``due_work(...).jobs`` says no: it must say yes for a
    due job of its queues (and promote must then move it), no for one not yet due."""
    conn = await raw_connection(session)
    now = await db_now(session)
    when = "run_at" if start is S.SCHEDULED else "next_attempt_at"
    later = await make_job(session, start, **{when: now + SECOND})
    assert not (await repository.due_work(conn, [later.queue])).jobs
    assert not await promote(session, later)
    due = await make_job(session, start, queue=later.queue)
    assert (await repository.due_work(conn, ["elsewhere", due.queue])).jobs
    assert not (await repository.due_work(conn, ["elsewhere"])).jobs
    for other in (S.QUEUED, S.RUNNING, S.SUCCEEDED, S.DEAD):  # never due, whatever their times
        assert not (await repository.due_work(conn, [(await make_job(session, other)).queue])).jobs
    assert await promote(session, due)
    assert not (await repository.due_work(conn, [due.queue])).jobs


async def test_reclaim_refuses_a_live_lease(session: AsyncSession) -> None:
    job = await make_job(session, S.RUNNING)  # lease until now + 30 s
    assert not await reclaim(session, job)
    assert (await snapshot(session, job.id))["status"] == S.RUNNING


async def test_reclaim_at_the_last_attempt_is_dead(session: AsyncSession) -> None:
    now = await db_now(session)
    job = await make_job(session, S.RUNNING, attempts=MAX_ATTEMPTS, lease_expires_at=now - SECOND)
    assert await reclaim(session, job)
    after = await snapshot(session, job.id)
    assert after["status"] == S.DEAD and after["finished_at"] is not None
    assert (await events(session, job.id))[-1] == "dead"


async def test_a_job_removed_from_the_dlq_is_neither_removed_again_nor_replayed(
    session: AsyncSession,
) -> None:
    job = await make_job(session, S.DEAD)
    assert await remove_from_dlq(session, job)
    assert not await remove_from_dlq(session, job)
    assert not await replay(session, job)
    assert (await snapshot(session, job.id))["status"] == S.DEAD
