"""/v1/jobs: submit, batch submit, read, list, cancel, history."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response

from app.api import render
from app.api.bodies import SUBMIT_OPENAPI, submission
from app.api.deps import PrincipalDep, SessionDep, StateDep, principal_of, state_of
from app.api.errors import ERRORS
from app.jobs import queries, service
from app.jobs.queries import Cursor, JobFilter
from app.jobs.schemas import (
    QUEUE_PATTERN,
    TYPE_PATTERN,
    Job,
    JobBatch,
    JobBatchCreate,
    JobEventOut,
    JobPage,
    UtcDatetime,
)
from app.jobs.status import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

PAGE_LIMIT = (
    "At most this many items; fewer when they would pass CONVEYOR_PAGE_MAX_BYTES (the page"
    " then still has a `next_cursor`)."
)


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses={200: {"model": Job, "description": "Repeat of an idempotent request"}, **ERRORS},
    openapi_extra=SUBMIT_OPENAPI,
)
async def submit_job(request: Request) -> Response:
    """Submit one job. A repeat with the same idempotency key and request returns 200 and the
    original job; the same key with a different request is 409. Keys are scoped per API key
    and live as long as the job."""
    body, idempotency_key = await submission(request)
    body = service.with_idempotency_header(body, idempotency_key)
    state, principal = state_of(request), principal_of(request)
    answer = await service.submit(state.intake, state.registry, body, principal)
    return render.submitted(answer, principal.view)


@router.post("/batch", status_code=202, response_model=JobBatch, responses=ERRORS)
async def submit_batch(body: JobBatchCreate, request: Request) -> Response:
    """Submit up to 1000 jobs at once: all are created, or none (422 names each bad index).

    One INSERT and one Redis pipeline for the whole batch. Items may carry idempotency keys:
    repeating a batch returns the same jobs; a key used twice in one batch with the same
    request names one job (returned at both positions), with different requests it is a 422.
    """
    state, principal = state_of(request), principal_of(request)
    answers = await service.submit_batch(state.intake, state.registry, body.jobs, principal)
    return render.submitted_batch(answers, principal.view)


@router.get("", responses=ERRORS)
async def list_jobs(
    session: SessionDep,
    state: StateDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    type: Annotated[str | None, Query(pattern=TYPE_PATTERN)] = None,
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
    created_after: Annotated[
        UtcDatetime | None, Query(description="Only jobs created after this (with a zone).")
    ] = None,
    created_before: Annotated[
        UtcDatetime | None, Query(description="Only jobs created before this (with a zone).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description=PAGE_LIMIT)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> JobPage:
    """Jobs newest first, filtered; follow `next_cursor` for the next page.

    Keyset pagination over (created_at, id): a page costs the same at any depth, and jobs
    created while you page do not shift the pages, so every job that matched when you began
    is returned exactly once (unless its status changes under a `status` filter).

    Items are whole Jobs. A page holds at most `limit` of them and ends early, before its
    items pass about `CONVEYOR_PAGE_MAX_BYTES` (default 4 MiB), though it always holds one:
    a page shorter than `limit` is not the last; only `next_cursor: null` is."""
    owner = None if principal.admin else principal.name
    f = JobFilter(status, type, queue, created_after, created_before, owner)
    rows, nxt = await queries.list_jobs(
        session, f, limit, Cursor.decode(cursor) if cursor else None, state.settings.page_max_bytes
    )
    return JobPage(
        items=[Job.model_validate(r, context=principal.view) for r in rows],
        next_cursor=nxt.encode() if nxt else None,
    )


@router.get("/{job_id}", responses=ERRORS)
async def get_job(job_id: UUID, session: SessionDep, principal: PrincipalDep) -> Job:
    return Job.model_validate(await service.get(session, job_id, principal), context=principal.view)


@router.post(
    "/{job_id}/cancel",
    responses={202: {"model": Job, "description": "A running job asked to stop"}, **ERRORS},
)
async def cancel_job(
    job_id: UUID, session: SessionDep, principal: PrincipalDep, response: Response
) -> Job:
    """Cancel a job. A queued, scheduled or retrying job is `cancelled` at once (200). A
    running job is asked to stop (202, still `running` with `cancel_requested_at`): its
    worker cancels the handler within one heartbeat interval and the job ends `cancelled`,
    unless the attempt finished first (it keeps that outcome). A finished job gives 409."""
    job = await service.cancel(session, job_id, principal)
    if job.status == JobStatus.RUNNING:
        response.status_code = 202
    return Job.model_validate(job, context=principal.view)


@router.get("/{job_id}/events", responses=ERRORS)
async def job_events(
    job_id: UUID, session: SessionDep, principal: PrincipalDep
) -> list[JobEventOut]:
    """Every transition of the job, oldest first."""
    await service.get(session, job_id, principal)
    return [
        JobEventOut.model_validate(e, context=principal.view)
        for e in await queries.events(session, job_id)
    ]
