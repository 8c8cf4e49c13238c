"""``GET /v1/jobs/{id}/events?follow=true``: a job's transitions (and progress) as they happen.

The stream sends the history first, then every new ``job_events`` row and every new progress
value, and ends after the job's terminal status. It wakes on the process's job-change
notifications (:mod:`app.jobs.watch`); without one it reads again every
``CONVEYOR_WAIT_RECHECK_SECONDS`` (covering a lost message, Redis down, and the transitions no
one announces, such as a promotion). Each read holds a connection for its two statements only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from app.errors import NotFound
from app.jobs import queries, service
from app.jobs.principal import Principal
from app.jobs.schemas import JobEventOut, JobProgress
from app.jobs.status import TERMINAL
from app.jobs.waiting import Sessions
from app.jobs.watch import Watch


@dataclass(frozen=True)
class Update:
    """One SSE event: ``kind`` is ``transition`` or ``progress``, or ``keepalive`` (no data)."""

    kind: str
    data: dict[str, Any] | None = None
    id: int | None = None


async def follow(
    sessions: Sessions,
    watch: Watch,
    job_id: UUID,
    principal: Principal,
    *,
    after: int | None = None,
) -> AsyncIterator[Update]:
    """The updates of a job the caller was allowed to see (check before streaming: a 404
    must be an answer, not a stream). ``after``: resume after this event id."""
    view: Mapping[str, bool] = principal.view
    progress: Any = None
    with watch.waiter(job_id, changes=True) as waiter:
        while True:
            try:
                async with sessions() as session:
                    # the row first: an event written after it is read again next time
                    job = await service.get(session, job_id, principal)
                    events = await queries.events(session, job_id, after)
            except NotFound:  # deleted meanwhile (retention): nothing more will come
                return
            for event in events:
                data = JobEventOut.model_validate(event, context=view).model_dump(mode="json")
                yield Update("transition", {**data, "id": event.id}, event.id)
                after = event.id
            if job.progress is not None and job.progress != progress:
                progress = job.progress
                yield Update("progress", JobProgress.model_validate(progress).model_dump())
            if job.status in TERMINAL:
                return
            if not await waiter.wait(watch.recheck_seconds):
                yield Update("keepalive")
