"""/v1/jobs: submit (and wait), batch submit, read (and wait), list, cancel, history (and
follow)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response

from app.api import render, sse
from app.api.bodies import SUBMIT_OPENAPI, WAIT_DESCRIPTION, submission, wait_seconds
from app.api.deps import PrincipalDep, SessionDep, StateDep, principal_of, state_of
from app.api.errors import ERRORS
from app.jobs import queries, reading, service, waiting
from app.jobs.follow import follow as follow_job
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

WaitQuery = Annotated[
    float | None, Query(gt=0, le=waiting.MAX_WAIT_SECONDS, description=WAIT_DESCRIPTION)
]

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
    and live as long as the job.

    With `?wait=S`: the answer waits until the job is terminal (200 with its result) or S
    seconds pass (202 with its current state); a repeat is 200 either way."""
    wait = wait_seconds(request)
    body, idempotency_key = await submission(request)
    body = service.with_idempotency_header(body, idempotency_key)
    state, principal = state_of(request), principal_of(request)
    if wait is None:
        answer = await service.submit(state.intake, state.registry, body, principal)
        return render.submitted(answer, principal.view)
    waited = await waiting.submit_and_wait(
        state.intake, state.registry, state.watch, body, principal, wait
    )
    return render.waited(waited, principal.view)


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


@router.get("/{job_id}", response_model=Job, responses=ERRORS)
async def get_job(
    job_id: UUID,
    state: StateDep,
    principal: PrincipalDep,
    wait: WaitQuery = None,
) -> Response:
    """The job; with `?wait=S`, as soon as it is terminal, or as it is when S seconds pass.

    A waiting request holds no database connection: it is woken by the job-change
    notifications of its process (or their slow re-check)."""
    if wait is None:
        intake = state.intake
        row = await reading.job(intake.pool, intake.acquire_timeout, job_id, principal)
    else:
        row = await waiting.wait_for_job(state.watch, job_id, principal, wait)
    return render.stored_job(row, principal.view)


@router.post(
    "/{job_id}/cancel",
    responses={202: {"model": Job, "description": "A running job asked to stop"}, **ERRORS},
)
async def cancel_job(
    job_id: UUID,
    session: SessionDep,
    state: StateDep,
    principal: PrincipalDep,
    response: Response,
) -> Job:
    """Cancel a job. A queued, scheduled or retrying job is `cancelled` at once (200). A
    running job is asked to stop (202, still `running` with `cancel_requested_at`): its
    worker cancels the handler within one heartbeat interval and the job ends `cancelled`,
    unless the attempt finished first (it keeps that outcome). A finished job gives 409."""
    job = await service.cancel(session, job_id, principal)
    if job.status == JobStatus.RUNNING:
        response.status_code = 202  # the worker's outcome will wake `?wait=` requests
        await state.watch.publish(terminal=[], changed=[job.id])
    else:
        await state.watch.publish(terminal=[job.id])  # wakes `?wait=` requests and followers
    return Job.model_validate(job, context=principal.view)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEventOut],
    responses={
        **ERRORS,
        200: {
            "description": "The history (JSON), or with `follow=true` a live event stream",
            "content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
    },
)
async def job_events(
    job_id: UUID,
    state: StateDep,
    principal: PrincipalDep,
    follow: Annotated[
        bool,
        Query(
            description="Stream Server-Sent Events: the history, then each transition"
            " (`event: transition`) and progress update (`event: progress`) as it happens;"
            " the stream ends after the terminal transition.",
        ),
    ] = False,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> Response:
    """Every transition of the job, oldest first."""
    async with state.sessions() as session:
        await service.get(session, job_id, principal)  # 404 before anything is streamed
        if not follow:
            events = await queries.events(session, job_id)
            items = [JobEventOut.model_validate(e, context=principal.view) for e in events]
            return render.events(items)
    after = sse.last_event_id(last_event_id)
    return sse.stream(follow_job(state.sessions, state.watch, job_id, principal, after=after))
