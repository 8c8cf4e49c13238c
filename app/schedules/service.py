"""Create, read, change, delete and trigger schedules: the operations behind the API."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow, ScheduleRow
from app.errors import Conflict, NotFound
from app.jobs.dispatch import Dispatcher
from app.jobs.principal import Principal
from app.jobs.registry import Registry
from app.jobs.repository import Target
from app.schedules import repository
from app.schedules.cron import parse
from app.schedules.repository import NewJob
from app.schedules.schemas import ScheduleCreate, ScheduleUpdate

log = logging.getLogger(__name__)

_TIMING = ("cron", "timezone", "enabled")


def _checked(values: dict[str, Any], registry: Registry, *, payload: bool = True) -> dict[str, Any]:
    """Validate the timing and (with ``payload``) the payload against the type; normalise."""
    parse(values["cron"], values["timezone"])
    checked = {**values, "cron": " ".join(values["cron"].split())}
    if payload:
        job_type = registry.get(values["type"])
        checked["payload"] = job_type.validate(values["payload"]).model_dump(mode="json")
    return checked


async def _next_run(session: AsyncSession, values: dict[str, Any]) -> Any:
    if not values["enabled"]:
        return None
    now = await repository.db_now(session)
    return parse(values["cron"], values["timezone"]).next_after(now)


async def create(session: AsyncSession, registry: Registry, body: ScheduleCreate) -> ScheduleRow:
    values = _checked(body.model_dump(), registry)
    values["next_run_at"] = await _next_run(session, values)
    row = await repository.insert(session, values)
    if row is None:
        await session.rollback()
        raise Conflict(f"a schedule named {body.name!r} exists", details={"name": body.name})
    await session.commit()
    log.info("schedule %s created", body.name)
    return row


async def get(session: AsyncSession, name: str) -> ScheduleRow:
    row = await repository.get(session, name)
    if row is None:
        raise NotFound(f"no schedule named {name!r}")
    return row


async def page(
    session: AsyncSession, limit: int, cursor: str | None
) -> tuple[list[ScheduleRow], str | None]:
    rows = await repository.page(session, limit + 1, cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].name if more else None)


async def update(
    session: AsyncSession, registry: Registry, name: str, body: ScheduleUpdate
) -> ScheduleRow:
    """Change some fields; a new cron, time zone or a resume moves ``next_run_at`` to the
    first slot after now (slots while paused are not made up for)."""
    row = await repository.get(session, name, lock=True)
    if row is None:
        raise NotFound(f"no schedule named {name!r}")
    changes = body.model_dump(exclude_unset=True)
    current = {f: getattr(row, f) for f in ScheduleCreate.model_fields if f != "name"}
    # the payload is checked when it or the type changes: pausing a schedule whose type this
    # process does not know (removed from the code, say) must still work
    new_payload = "type" in changes or "payload" in changes
    values = _checked({**current, **changes}, registry, payload=new_payload)
    retime = any(values[f] != current[f] for f in _TIMING)
    if retime:
        values["next_run_at"] = await _next_run(session, values)
    updated = await repository.change(session, name, values)
    assert updated is not None  # locked above
    await session.commit()
    log.info("schedule %s changed: %s", name, ",".join(sorted(changes)) or "nothing")
    return updated


async def set_enabled(
    session: AsyncSession, registry: Registry, name: str, enabled: bool
) -> ScheduleRow:
    return await update(session, registry, name, ScheduleUpdate(enabled=enabled))


async def delete(session: AsyncSession, name: str) -> None:
    removed = await repository.remove(session, name)
    await session.commit()
    if not removed:
        raise NotFound(f"no schedule named {name!r}")
    log.info("schedule %s deleted", name)


async def trigger(
    session: AsyncSession, dispatcher: Dispatcher, name: str, principal: Principal
) -> JobRow:
    """Make one job now, outside the slots (``scheduled_for`` is null), paused or not."""
    row = await get(session, name)
    job = NewJob.of(row, None, principal.name)
    [made] = await repository.insert_jobs(session, [job])
    await repository.mark_triggered(session, name)
    await session.commit()
    await dispatcher.send_after_commit([Target(made.id, made.queue, made.priority)])
    log.info("schedule triggered", extra={"job_id": str(made.id), "schedule": name})
    return made
