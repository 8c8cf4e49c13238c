"""/v1/schedules: periodic jobs (admin only, reading too)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.api.deps import AdminDep, DispatcherDep, RegistryDep, SessionDep
from app.api.errors import ERRORS
from app.jobs.schemas import Job
from app.schedules import service
from app.schedules.schemas import (
    NAME_PATTERN,
    Schedule,
    ScheduleCreate,
    SchedulePage,
    ScheduleUpdate,
)

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])
Name = Annotated[str, Path(pattern=NAME_PATTERN)]


@router.get("", responses=ERRORS)
async def list_schedules(
    session: SessionDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
) -> SchedulePage:
    """Schedules by name; `next_cursor` continues the listing."""
    rows, nxt = await service.page(session, limit, cursor)
    return SchedulePage(items=[Schedule.model_validate(r) for r in rows], next_cursor=nxt)


@router.post("", status_code=201, responses=ERRORS)
async def create_schedule(
    body: ScheduleCreate,
    response: Response,
    session: SessionDep,
    registry: RegistryDep,
    _: AdminDep,
) -> Schedule:
    """Create a schedule; its first slot is the first after now. 409 if the name is taken."""
    row = await service.create(session, registry, body)
    response.headers["Location"] = f"/v1/schedules/{row.name}"
    return Schedule.model_validate(row)


@router.get("/{name}", responses=ERRORS)
async def get_schedule(name: Name, session: SessionDep, _: AdminDep) -> Schedule:
    return Schedule.model_validate(await service.get(session, name))


@router.patch("/{name}", responses=ERRORS)
async def update_schedule(
    name: Name, body: ScheduleUpdate, session: SessionDep, registry: RegistryDep, _: AdminDep
) -> Schedule:
    """Change some fields. A new `cron` or `timezone` (or `enabled: true`) restarts the slots
    from now."""
    return Schedule.model_validate(await service.update(session, registry, name, body))


@router.delete("/{name}", status_code=204, responses=ERRORS)
async def delete_schedule(name: Name, session: SessionDep, _: AdminDep) -> Response:
    """Delete a schedule; the jobs it made stay. A schedule declared in code comes back at the
    next worker start."""
    await service.delete(session, name)
    return Response(status_code=204)


@router.post("/{name}/pause", responses=ERRORS)
async def pause_schedule(
    name: Name, session: SessionDep, registry: RegistryDep, _: AdminDep
) -> Schedule:
    """No new slots until resumed."""
    return Schedule.model_validate(await service.set_enabled(session, registry, name, False))


@router.post("/{name}/resume", responses=ERRORS)
async def resume_schedule(
    name: Name, session: SessionDep, registry: RegistryDep, _: AdminDep
) -> Schedule:
    """Slots again from the first after now; those that fell while paused are not made."""
    return Schedule.model_validate(await service.set_enabled(session, registry, name, True))


@router.post("/{name}/trigger", status_code=202, responses=ERRORS)
async def trigger_schedule(
    name: Name, session: SessionDep, dispatcher: DispatcherDep, principal: AdminDep
) -> Job:
    """Make one job now (paused or not); its `scheduled_for` is null."""
    return Job.model_validate(await service.trigger(session, dispatcher, name, principal))
