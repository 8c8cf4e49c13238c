"""Submit, cancel, replay: the operations behind the API. The service commits, then XADDs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.errors import Conflict, InvalidInput, NotFound
from app.jobs import queries, repository
from app.jobs.dispatch import Dispatcher
from app.jobs.insertion import Submitted
from app.jobs.intake import Intake
from app.jobs.newjob import NewJob, new_job, parse
from app.jobs.principal import Principal
from app.jobs.registry import Registry
from app.jobs.repository import Target
from app.jobs.schemas import JobCreate
from app.jobs.status import CANCELLABLE, JobStatus
from app.observe import families, tracing
from app.observe.tally import TALLY

log = logging.getLogger(__name__)

REPLAY_CHUNK = 500


def _fields(job: JobRow, event: str) -> dict[str, object]:
    return {"event": event, "job_id": str(job.id), "type": job.type, "queue": job.queue}


def with_idempotency_header(item: JobCreate, header: str | None) -> JobCreate:
    """The ``Idempotency-Key`` header fills the field; both given and different is a 422."""
    if header is None:
        return item
    if item.idempotency_key is not None and item.idempotency_key != header:
        raise InvalidInput("the Idempotency-Key header and idempotency_key field differ")
    return item.model_copy(update={"idempotency_key": header})


async def submit(
    intake: Intake, registry: Registry, item: JobCreate, principal: Principal
) -> Submitted:
    """Validate one job, then insert it with whatever else is being submitted (group commit),
    commit, and XADD it. Bad input is a 422 before the job joins a group. With tracing on, in
    a span whose context the job keeps."""
    with tracing.submitting(item.type, item.queue) as span:
        job = new_job(item, registry, principal, datetime.now(UTC), span.traceparent)
        answer = await intake.submit(job)
        span.submitted([answer.id])
    return answer


async def submit_batch(
    intake: Intake, registry: Registry, items: Sequence[object], principal: Principal
) -> list[Submitted]:
    """Validate every item (a 422 names each bad index), insert all in one statement and one
    transaction, commit, then XADD the queued ones in one pipeline.

    One idempotency key used twice in a batch with the same request names one job (both
    positions return it); with different requests, both indexes are named in the 422. The
    unique index on (scope, idempotency key) decides between concurrent repeats.
    """
    with tracing.submitting(None, None, len(items)) as span:
        jobs, positions = _new_jobs(items, registry, principal, span.traceparent)
        answers = await intake.submit_batch(jobs)  # one answer per distinct job, in order
        span.submitted([a.id for a in answers])
    return [answers[at] for at in positions]


def _new_jobs(
    items: Sequence[object], registry: Registry, principal: Principal, traceparent: str | None
) -> tuple[list[NewJob], list[int]]:
    """The distinct jobs to insert, and for each item the index of its job among them."""
    now = datetime.now(UTC)
    jobs: list[NewJob] = []
    positions: list[int] = []
    problems: list[dict[str, Any]] = []
    by_key: dict[str, tuple[int, int]] = {}  # key -> (first item index, job index)
    for index, item in enumerate(items):
        try:
            job = new_job(parse(item), registry, principal, now, traceparent)
        except InvalidInput as exc:
            problems.append({"index": index, "message": exc.message, "details": exc.details})
            continue
        key = job.idempotency_key
        if key is not None and key in by_key:
            first, at = by_key[key]
            if jobs[at].request_hash != job.request_hash:
                problems.append(_duplicate_key(index, first, key))
            positions.append(at)
            continue
        if key is not None:
            by_key[key] = (index, len(jobs))
        positions.append(len(jobs))
        jobs.append(job)
    if problems:
        raise InvalidInput(f"{len(problems)} invalid job(s) in the batch", details=problems)
    return jobs, positions


def _duplicate_key(index: int, first: int, key: str) -> dict[str, Any]:
    return {
        "index": index,
        "message": f"idempotency key also used by item {first} with a different request",
        "details": {"idempotency_key": key, "first_index": first},
    }


async def get(session: AsyncSession, job_id: UUID, principal: Principal) -> JobRow:
    return shown(await queries.get_job(session, job_id), principal)


def shown(job: JobRow | None, principal: Principal) -> JobRow:
    """The job, if it exists and the caller may see it; else 404 (the same answer for both)."""
    if job is None or not principal.sees(job.owner):
        raise NotFound("job not found")
    return job


async def cancel(session: AsyncSession, job_id: UUID, principal: Principal) -> JobRow:
    """A waiting job ends ``cancelled`` now; a running one is asked to stop (it stays
    ``running`` with ``cancel_requested_at`` until its worker reports)."""
    await get(session, job_id, principal)
    job = await repository.cancel(session, job_id, principal.name)
    if job is None:
        job = await repository.request_cancel(session, job_id, principal.name)
    await session.commit()
    if job is not None:
        if job.status == JobStatus.CANCELLED:
            TALLY.count(families.CANCELLED, (job.queue, job.type))
            log.info("job cancelled", extra=_fields(job, "cancelled"))
        else:
            log.info("job cancel requested", extra=_fields(job, "cancel_requested"))
        return job
    current = await get(session, job_id, principal)
    if current.status == JobStatus.RUNNING and current.cancel_requested_at is not None:
        return current  # asked already: the same answer again
    if current.status in CANCELLABLE or current.status == JobStatus.RUNNING:  # moved under us
        raise Conflict("job changed state; try again", details={"status": current.status})
    raise Conflict(
        f"a {current.status} job cannot be cancelled", details={"status": current.status}
    )


async def replay_one(
    session: AsyncSession, dispatcher: Dispatcher, job_id: UUID, principal: Principal
) -> JobRow:
    rows = await repository.replay(session, principal.name, ids=[job_id])
    await session.commit()
    if not rows:
        raise NotFound("job is not in the dead-letter queue")
    await dispatcher.send_after_commit([Target(r.id, r.queue, r.priority) for r in rows])
    TALLY.count(families.REPLAYED, (rows[0].queue, rows[0].type))
    log.info("job replayed", extra=_fields(rows[0], "replayed"))
    return rows[0]


async def replay_many(
    session: AsyncSession,
    dispatcher: Dispatcher,
    principal: Principal,
    *,
    ids: list[UUID] | None,
    type: str | None,
    queue: str | None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> int:
    """Replay in chunks, each its own transaction, so a huge DLQ never holds one long lock.

    A filter takes the jobs that were dead when the request began: one that dies again at
    once (an unknown type, a permanent failure) is not replayed a second time, so the loop
    ends however fast the workers kill what it replays.
    """
    dead_before = await queries.db_now(session) if ids is None else None

    async def chunk(chunk_ids: list[UUID] | None) -> int:
        rows = await repository.replay(
            session,
            principal.name,
            ids=chunk_ids,
            type=type,
            queue=queue,
            created_after=created_after,
            created_before=created_before,
            dead_before=dead_before,
            limit=REPLAY_CHUNK,
        )
        await session.commit()
        await dispatcher.send_after_commit([Target(r.id, r.queue, r.priority) for r in rows])
        for r in rows:
            TALLY.count(families.REPLAYED, (r.queue, r.type))
            log.info("job replayed", extra=_fields(r, "replayed"))
        return len(rows)

    total = 0
    if ids is not None:
        for start in range(0, len(ids), REPLAY_CHUNK):
            total += await chunk(ids[start : start + REPLAY_CHUNK])
    else:
        while (moved := await chunk(None)) > 0:
            total += moved
            if moved < REPLAY_CHUNK:
                break
    log.info("bulk replay", extra={"replayed": total})
    return total


async def remove_from_dlq(session: AsyncSession, job_id: UUID, principal: Principal) -> None:
    removed = await repository.remove_from_dlq(session, job_id, principal.name)
    await session.commit()
    if not removed:
        raise NotFound("job is not in the dead-letter queue")
