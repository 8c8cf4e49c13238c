"""/v1/dlq: the dead-letter queue: list, replay (one, many, by filter), remove."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from app.api.deps import AdminDep, DispatcherDep, PrincipalDep, SessionDep, StateDep
from app.api.errors import ERRORS
from app.api.routes.jobs import PAGE_LIMIT
from app.jobs import queries, service
from app.jobs.queries import Cursor, JobFilter
from app.jobs.schemas import QUEUE_PATTERN, TYPE_PATTERN, Job, JobPage, ReplayRequest, ReplayResult

router = APIRouter(prefix="/v1/dlq", tags=["dead-letter queue"])


@router.get("", responses=ERRORS)
async def list_dead(
    session: SessionDep,
    state: StateDep,
    principal: PrincipalDep,
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
    type: Annotated[str | None, Query(pattern=TYPE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500, description=PAGE_LIMIT)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> JobPage:
    """Dead jobs with their full error history, most recently dead first.

    Items are whole Jobs. A page holds at most `limit` of them and ends early, before its
    items pass about `CONVEYOR_PAGE_MAX_BYTES` (default 4 MiB), though it always holds one:
    a page shorter than `limit` is not the last; only `next_cursor: null` is."""
    owner = None if principal.admin else principal.name
    f = JobFilter(type=type, queue=queue, owner=owner)
    rows, nxt = await queries.list_dead(
        session, f, limit, Cursor.decode(cursor) if cursor else None, state.settings.page_max_bytes
    )
    return JobPage(
        items=[Job.model_validate(r, context=principal.view) for r in rows],
        next_cursor=nxt.encode() if nxt else None,
    )


@router.post("/replay", status_code=202, responses=ERRORS)
async def replay_many(
    body: ReplayRequest, session: SessionDep, dispatcher: DispatcherDep, principal: AdminDep
) -> ReplayResult:
    """Replay dead jobs by `ids`, or all matching a filter: `type`, `queue`, and a range of
    creation times (`created_after`, `created_before`); the filters combine. Only jobs dead
    when the request began are replayed. `replayed` counts those queued again."""
    n = await service.replay_many(
        session,
        dispatcher,
        principal,
        ids=body.ids,
        type=body.type,
        queue=body.queue,
        created_after=body.created_after,
        created_before=body.created_before,
    )
    return ReplayResult(replayed=n)


@router.post("/{job_id}/replay", status_code=202, responses=ERRORS)
async def replay_one(
    job_id: UUID, session: SessionDep, dispatcher: DispatcherDep, principal: AdminDep
) -> Job:
    """Queue a dead job again: attempts back to 0, error history kept."""
    return Job.model_validate(
        await service.replay_one(session, dispatcher, job_id, principal), context=principal.view
    )


@router.delete("/{job_id}", status_code=204, responses=ERRORS)
async def remove(job_id: UUID, session: SessionDep, principal: AdminDep) -> Response:
    """Take a job out of the DLQ; it stays `dead`."""
    await service.remove_from_dlq(session, job_id, principal)
    return Response(status_code=204)
