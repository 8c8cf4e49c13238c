"""/v1/jobs: submit, batch submit, read, list, cancel, history."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response

from app.api import render
from app.api.bodies import SUBMIT_OPENAPI, submission
from app.api.deps import PrincipalDep, SessionDep, principal_of, state_of
from app.jobs import queries, service
from app.jobs.queries import Cursor, JobFilter
from app.jobs.schemas import (
    QUEUE_PATTERN,
    TYPE_PATTERN,
    ErrorBody,
    Job,
    JobBatch,
    JobBatchCreate,
    JobEventOut,
    JobPage,
    UtcDatetime,
)
from app.jobs.status import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Host header not in CONVEYOR_ALLOWED_HOSTS"},
    401: {
        "model": ErrorBody,
        "description": "No API key, or an unknown one",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: {"model": ErrorBody, "description": "The key's role may not do this"},
    404: {"model": ErrorBody, "description": "No such job (or not yours)"},
    409: {
        "model": ErrorBody,
        "description": "Conflicts with the job's state or an earlier request",
    },
    413: {"model": ErrorBody, "description": "Body larger than CONVEYOR_MAX_PAYLOAD_BYTES"},
    415: {
        "model": ErrorBody,
        "description": "Body is not application/json; or, with auth off, a state-changing"
        " request with neither that type nor an X-Requested-With header",
    },
    422: {"model": ErrorBody, "description": "Invalid input; nothing was written"},
    429: {"model": ErrorBody, "description": "Rate limit exceeded", "headers": _RETRY_AFTER},
    503: {
        "model": ErrorBody,
        "description": "Postgres or Redis unreachable; nothing was written",
        "headers": _RETRY_AFTER,
    },
}


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
    return render.submitted(await service.submit(state.intake, state.registry, body, principal))


@router.post("/batch", status_code=202, response_model=JobBatch, responses=ERRORS)
async def submit_batch(body: JobBatchCreate, request: Request) -> Response:
    """Submit up to 1000 jobs at once: all are created, or none (422 names each bad index).

    One INSERT and one Redis pipeline for the whole batch. Items may carry idempotency keys:
    repeating a batch returns the same jobs; a key used twice in one batch with the same
    request names one job (returned at both positions), with different requests it is a 422.
    """
    state, principal = state_of(request), principal_of(request)
    answers = await service.submit_batch(state.intake, state.registry, body.jobs, principal)
    return render.submitted_batch(answers)


@router.get("", responses=ERRORS)
async def list_jobs(
    session: SessionDep,
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
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> JobPage:
    """Jobs newest first, filtered; follow `next_cursor` for the next page.

    Keyset pagination over (created_at, id): a page costs the same at any depth, and jobs
    created while you page do not shift the pages, so every job that matched when you began
    is returned exactly once (unless its status changes under a `status` filter)."""
    owner = None if principal.admin else principal.name
    f = JobFilter(status, type, queue, created_after, created_before, owner)
    rows, nxt = await queries.list_jobs(
        session, f, limit, Cursor.decode(cursor) if cursor else None
    )
    return JobPage(
        items=[Job.model_validate(r) for r in rows], next_cursor=nxt.encode() if nxt else None
    )


@router.get("/{job_id}", responses=ERRORS)
async def get_job(job_id: UUID, session: SessionDep, principal: PrincipalDep) -> Job:
    return Job.model_validate(await service.get(session, job_id, principal))


@router.post("/{job_id}/cancel", responses=ERRORS)
async def cancel_job(job_id: UUID, session: SessionDep, principal: PrincipalDep) -> Job:
    """Cancel a queued, scheduled or retrying job. Running or finished jobs give 409."""
    return Job.model_validate(await service.cancel(session, job_id, principal))


@router.get("/{job_id}/events", responses=ERRORS)
async def job_events(
    job_id: UUID, session: SessionDep, principal: PrincipalDep
) -> list[JobEventOut]:
    """Every transition of the job, oldest first."""
    await service.get(session, job_id, principal)
    return [JobEventOut.model_validate(e) for e in await queries.events(session, job_id)]
