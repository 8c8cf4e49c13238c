"""Submit, cancel, replay: the operations behind the API. The service commits, then XADDs."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.errors import Conflict, InvalidInput, NotFound
from app.jobs import queries, repository
from app.jobs.dispatch import Dispatcher
from app.jobs.registry import Registry
from app.jobs.repository import Target
from app.jobs.schemas import JobCreate
from app.jobs.status import CANCELLABLE, JobStatus

log = logging.getLogger(__name__)

REPLAY_CHUNK = 500


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``scope`` namespaces idempotency keys; ``name`` is recorded as actor."""

    name: str | None
    scope: str
    admin: bool

    @property
    def view(self) -> dict[str, bool]:
        """The validation context of the API's output models: tracebacks and worker names,
        hosts and pids are for admins (and everyone when auth is off)."""
        return {"internals": self.admin}


@dataclass(frozen=True)
class Submitted:
    job: JobRow
    created: bool


def _request_hash(item: JobCreate, payload: dict[str, Any]) -> str:
    """What makes two requests "the same": every field as given, with the payload as its type
    normalises it and ``run_at`` in UTC (``delay_seconds`` is hashed as given, not resolved)."""
    body = item.model_dump(mode="json", exclude={"idempotency_key", "payload", "run_at"})
    body["payload"] = payload
    body["run_at"] = item.run_at.astimezone(UTC).isoformat() if item.run_at else None
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _parse(item: object) -> JobCreate:
    """Batch items arrive unvalidated, so that one 422 can name every bad index."""
    try:
        return JobCreate.model_validate(item)
    except ValidationError as exc:
        details = [{k: e[k] for k in ("loc", "msg", "type")} for e in exc.errors()]
        raise InvalidInput("invalid job", details=details) from exc


def _row(raw: object, registry: Registry, principal: Principal, now: datetime) -> dict[str, Any]:
    item = _parse(raw)
    job_type = registry.get(item.type)
    payload = job_type.validate(item.payload).model_dump(mode="json")
    run_at = item.run_at
    if item.delay_seconds is not None:
        run_at = now + timedelta(seconds=item.delay_seconds)
    scheduled = run_at is not None and run_at > now
    return {
        "id": str(uuid.uuid4()),
        "type": item.type,
        "queue": item.queue,
        "status": JobStatus.SCHEDULED if scheduled else JobStatus.QUEUED,
        "priority": item.priority,
        "payload": payload,
        "max_attempts": item.max_attempts,
        "timeout_seconds": item.timeout_seconds,
        "idempotency_key": item.idempotency_key,
        "idempotency_scope": principal.scope,
        "request_hash": _request_hash(item, payload) if item.idempotency_key else None,
        "owner": principal.name,
        "run_at": run_at.isoformat() if run_at else None,
    }


def with_idempotency_header(item: JobCreate, header: str | None) -> JobCreate:
    """The ``Idempotency-Key`` header fills the field; both given and different is a 422."""
    if header is None:
        return item
    if item.idempotency_key is not None and item.idempotency_key != header:
        raise InvalidInput("the Idempotency-Key header and idempotency_key field differ")
    return item.model_copy(update={"idempotency_key": header})


def _rows(
    items: Sequence[object],
    registry: Registry,
    principal: Principal,
    *,
    batch: bool,
) -> list[dict[str, Any]]:
    """Validate every item; a batch with any bad item is rejected whole, naming each index.

    One idempotency key used twice in a batch with the same request names one job (both
    positions return it); with different requests, both indexes are named in the 422.
    """
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    by_key: dict[str, tuple[int, dict[str, Any]]] = {}
    for index, item in enumerate(items):
        try:
            row = _row(item, registry, principal, now)
        except InvalidInput as exc:
            problems.append({"index": index, "message": exc.message, "details": exc.details})
            continue
        key = row["idempotency_key"]
        first = by_key.setdefault(key, (index, row)) if key is not None else (index, row)
        if first[1]["request_hash"] != row["request_hash"]:
            problems.append(_duplicate_key(index, first[0], key))
        rows.append(first[1])
    if problems:
        if not batch:
            raise InvalidInput(problems[0]["message"], details=problems[0]["details"])
        raise InvalidInput(f"{len(problems)} invalid job(s) in the batch", details=problems)
    return rows


def _duplicate_key(index: int, first: int, key: str) -> dict[str, Any]:
    return {
        "index": index,
        "message": f"idempotency key also used by item {first} with a different request",
        "details": {"idempotency_key": key, "first_index": first},
    }


def _resolve(
    rows: list[dict[str, Any]], inserted: dict[UUID, JobRow], existing: dict[str, JobRow]
) -> list[Submitted]:
    """Pair each item with its job: the one just inserted, or the one that holds its key."""
    results: list[Submitted] = []
    seen: set[UUID] = set()
    for row in rows:
        job = inserted.get(UUID(row["id"]))
        if job is not None:
            results.append(Submitted(job, created=job.id not in seen))
            seen.add(job.id)
            continue
        job = existing.get(row["idempotency_key"])
        if job is None or job.request_hash != row["request_hash"]:
            raise Conflict(
                "idempotency key was used with a different request",
                details={"idempotency_key": row["idempotency_key"]},
            )
        results.append(Submitted(job, created=False))
    return results


async def submit(
    session: AsyncSession,
    dispatcher: Dispatcher,
    registry: Registry,
    items: Sequence[object],
    principal: Principal,
    *,
    batch: bool = False,
) -> list[Submitted]:
    """Insert the jobs in one statement, commit, then XADD the queued ones in one pipeline.

    The unique index on (scope, idempotency key) decides between concurrent repeats: the
    insert skips a taken key, and the existing job is returned if its request is the same.
    """
    rows = _rows(items, registry, principal, batch=batch)
    unique = list({row["id"]: row for row in rows}.values())
    inserted = {row.id: row for row in await repository.insert_jobs(session, unique)}
    keys = [r["idempotency_key"] for r in rows if UUID(r["id"]) not in inserted]
    existing = await repository.find_by_keys(session, principal.scope, keys) if keys else {}
    try:
        results = _resolve(rows, inserted, existing)
    except Conflict:
        await session.rollback()
        raise
    await session.commit()
    fresh = [
        Target(s.job.id, s.job.queue, s.job.priority)
        for s in results
        if s.created and s.job.status == JobStatus.QUEUED
    ]
    await dispatcher.send_after_commit(fresh)
    for s in results:
        if s.created:
            log.info("job submitted", extra={"job_id": str(s.job.id), "job_type": s.job.type})
    return results


async def get(session: AsyncSession, job_id: UUID, principal: Principal) -> JobRow:
    job = await queries.get_job(session, job_id)
    if job is None or not _visible(job, principal):
        raise NotFound("job not found")
    return job


def _visible(job: JobRow, principal: Principal) -> bool:
    return principal.admin or principal.name is None or job.owner == principal.name


async def cancel(session: AsyncSession, job_id: UUID, principal: Principal) -> JobRow:
    await get(session, job_id, principal)
    job = await repository.cancel(session, job_id, principal.name)
    await session.commit()
    if job is not None:
        log.info("job cancelled", extra={"job_id": str(job_id)})
        return job
    current = await get(session, job_id, principal)
    if current.status in CANCELLABLE:  # raced with a promotion; the row moved under us
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
    log.info("job replayed", extra={"job_id": str(job_id)})
    return rows[0]


async def replay_many(
    session: AsyncSession,
    dispatcher: Dispatcher,
    principal: Principal,
    *,
    ids: list[UUID] | None,
    type: str | None,
    queue: str | None,
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
            dead_before=dead_before,
            limit=REPLAY_CHUNK,
        )
        await session.commit()
        await dispatcher.send_after_commit([Target(r.id, r.queue, r.priority) for r in rows])
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
