"""The dashboard at ``/ui``: server-rendered Jinja2 templates and htmx (decision 0021).

Pages (``/ui``, ``/ui/jobs``, ``/ui/jobs/{id}``, ``/ui/workers``, ``/ui/schedules``) are open
and carry no data: each loads its parts from ``/ui/part/...``, which, like ``/v1``, need a key
when keys are configured (the page sends the one the operator typed, kept in the tab's
``sessionStorage``) and go through the same rate limit. Actions are ``POST`` to
``/ui/part/...`` and call the same services as the JSON API; they answer a line of text for
the message bar and ``HX-Trigger: refresh``, which reloads the parts. Every value is
escaped by Jinja2's autoescaping: nothing from a job is ever parsed as markup.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import (
    AdminDep,
    DispatcherDep,
    PrincipalDep,
    RegistryDep,
    SessionDep,
    StateDep,
)
from app.errors import InvalidInput
from app.flow import service as flow
from app.jobs import queries, service
from app.jobs.queries import Cursor, JobFilter
from app.jobs.schemas import QUEUE_PATTERN, TYPE_PATTERN, Job, JobEventOut, WorkerOut
from app.jobs.status import TERMINAL, JobStatus
from app.schedules import service as schedules
from app.schedules.schemas import Schedule
from app.ui import charts

HERE = Path(__file__).resolve().parents[2] / "ui"
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape: on for .html
PAGE_SIZE = 50
SCHEDULES_SHOWN = 200

pages = APIRouter(prefix="/ui", include_in_schema=False)  # open: no data
parts = APIRouter(prefix="/ui/part", include_in_schema=False)  # keyed, like /v1

QueueName = Annotated[str, PathParam(pattern=QUEUE_PATTERN, max_length=200)]
ScheduleName = Annotated[str, PathParam(max_length=200)]


# -- helpers used by the templates ----------------------------------------------------------


def _ago(value: datetime | None) -> str:
    if value is None:
        return ""
    return _seconds((datetime.now(UTC) - value).total_seconds()) + " ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "\u2013"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


templates.env.filters.update(ago=_ago, seconds=_seconds, when=_when, pretty=_pretty)


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _done(message: str) -> HTMLResponse:
    """An action's answer: a line for the message bar; the parts reload."""
    body = templates.get_template("done.html").render(message=message)
    return HTMLResponse(body, headers={"HX-Trigger": "refresh"})


# -- the filter of the jobs page --------------------------------------------------------------

FilterQuery = Annotated[str | None, Query(max_length=200)]


def _time(value: str | None, name: str) -> datetime | None:
    """A time from the form: ISO 8601, read as UTC when it names no zone."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(
            f"{name}: not a date and time (YYYY-MM-DDTHH:MM, UTC)",
            details=[{"loc": ["query", name], "msg": "not a date and time", "type": "datetime"}],
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _filter(
    status: str | None, type: str | None, queue: str | None, after: str | None, before: str | None
) -> JobFilter:
    try:
        chosen = JobStatus(status) if status else None
    except ValueError as exc:
        raise InvalidInput(f"unknown status: {status}") from exc
    for name, value, pattern in (("type", type, TYPE_PATTERN), ("queue", queue, QUEUE_PATTERN)):
        if value and not _matches(pattern, value):
            raise InvalidInput(f"{name}: not a valid name")
    return JobFilter(
        chosen, type or None, queue or None, _time(after, "after"), _time(before, "before")
    )


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


@dataclass(frozen=True)
class JobsQuery:
    """The query of the jobs page and of its list part: the filter form and a page's cursor."""

    status: FilterQuery = None
    type: FilterQuery = None
    queue: FilterQuery = None
    after: FilterQuery = None
    before: FilterQuery = None
    cursor: FilterQuery = None

    def form(self) -> dict[str, str | None]:
        """The filter form's fields, set or not (the cursor is not one)."""
        return {k: v for k, v in asdict(self).items() if k != "cursor"}

    def job_filter(self) -> JobFilter:
        return _filter(self.status, self.type, self.queue, self.after, self.before)


JobsQueryDep = Annotated[JobsQuery, Depends()]


# -- pages ------------------------------------------------------------------------------------


@pages.get("", response_class=HTMLResponse)
async def overview_page(request: Request) -> HTMLResponse:
    return _page(request, "overview.html", nav="overview")


@pages.get("/jobs", response_class=HTMLResponse, response_model=None)
async def jobs_page(
    request: Request,
    registry: RegistryDep,
    params: JobsQueryDep,
    id: FilterQuery = None,
) -> Response:
    """The filter form; the list is a part. An id goes straight to that job's page."""
    form = params.form()
    if id and id.strip():
        try:
            return RedirectResponse(f"/ui/jobs/{UUID(id.strip())}", status_code=303)
        except ValueError:
            return _page(
                request,
                "jobs.html",
                422,
                nav="jobs",
                form=form,
                error=f"not a job id: {id}",
                types=registry.names(),
            )
    query = urlencode({k: v for k, v in {**form, "cursor": params.cursor}.items() if v})
    return _page(request, "jobs.html", nav="jobs", form=form, query=query, types=registry.names())


@pages.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: UUID) -> HTMLResponse:
    return _page(request, "job.html", nav="jobs", job_id=job_id)


@pages.get("/workers", response_class=HTMLResponse)
async def workers_page(request: Request) -> HTMLResponse:
    return _page(request, "workers.html", nav="workers")


@pages.get("/schedules", response_class=HTMLResponse)
async def schedules_page(request: Request) -> HTMLResponse:
    return _page(request, "schedules.html", nav="schedules")


# -- parts: read --------------------------------------------------------------------------------


@parts.get("/overview", response_class=HTMLResponse)
async def overview(request: Request, state: StateDep, _: PrincipalDep) -> HTMLResponse:
    """From the cached snapshot (the one ``/metrics`` uses): no query per tab."""
    assert state.snapshots is not None
    snap = await state.snapshots.get()
    queues = sorted({*snap.queues, *snap.controlled, *(q for w in snap.live for q in w.queues)})
    return _page(
        request,
        "part_overview.html",
        snap=snap,
        queues=queues,
        age=state.snapshots.age() or 0.0,
        throughput=charts.chart(
            [(p.at, p.succeeded) for p in snap.history],
            [(p.at, p.failed) for p in snap.history],
            unit="/min",
        ),
        wait=charts.chart(
            [(p.at, p.wait_p50) for p in snap.history],
            [(p.at, p.wait_p99) for p in snap.history],
            unit="s",
        ),
    )


@parts.get("/jobs", response_class=HTMLResponse)
async def jobs(
    request: Request,
    session: SessionDep,
    state: StateDep,
    principal: PrincipalDep,
    params: JobsQueryDep,
) -> HTMLResponse:
    f = params.job_filter()
    owner = None if principal.admin else principal.name
    f = JobFilter(f.status, f.type, f.queue, f.created_after, f.created_before, owner)
    rows, nxt = await queries.list_jobs(
        session,
        f,
        PAGE_SIZE,
        Cursor.decode(params.cursor) if params.cursor else None,
        state.settings.page_max_bytes,
    )
    base = {k: v for k, v in params.form().items() if v}
    dead = f.status == JobStatus.DEAD and principal.admin
    return _page(
        request,
        "part_jobs.html",
        jobs=[Job.model_validate(r, context=principal.view) for r in rows],
        next_query=urlencode({**base, "cursor": nxt.encode()}) if nxt else None,
        first_query=urlencode(base) if params.cursor else None,
        dead=dead,
        dead_count=await queries.count_dead(session, f) if dead else 0,
        filter=base,
    )


@parts.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job(
    request: Request, job_id: UUID, session: SessionDep, principal: PrincipalDep
) -> HTMLResponse:
    row = await service.get(session, job_id, principal)
    shown = Job.model_validate(row, context=principal.view)
    events = [
        JobEventOut.model_validate(e, context=principal.view)
        for e in await queries.events(session, job_id)
    ]
    return _page(
        request,
        "part_job.html",
        job=shown,
        events=events,
        terminal=shown.status in TERMINAL,
        in_dlq=shown.status == JobStatus.DEAD and await queries.in_dlq(session, job_id),
        admin=principal.admin,
    )


@parts.get("/workers", response_class=HTMLResponse)
async def workers(request: Request, state: StateDep, principal: PrincipalDep) -> HTMLResponse:
    assert state.snapshots is not None
    snap = await state.snapshots.get()
    running: dict[str, list[Any]] = {}
    for r in snap.running:
        if principal.sees(r.owner):
            running.setdefault(r.worker or "", []).append(r)
    return _page(
        request,
        "part_workers.html",
        workers=[WorkerOut.model_validate(w, context=principal.view) for w in snap.live],
        running=running,
        age=state.snapshots.age() or 0.0,
    )


@parts.get("/schedules", response_class=HTMLResponse)
async def schedule_list(
    request: Request, session: SessionDep, principal: PrincipalDep
) -> HTMLResponse:
    if not principal.admin:
        return _page(request, "part_schedules.html", items=None)
    rows, _ = await schedules.page(session, SCHEDULES_SHOWN, None)
    return _page(request, "part_schedules.html", items=[Schedule.model_validate(r) for r in rows])


# -- parts: actions (POST; admin, except cancel, which a producer may do to its own jobs) ------


class ReplayForm(BaseModel):
    """The selected jobs (``ids``), or ``all: "matching"`` and the filter of the jobs page."""

    model_config = ConfigDict(extra="forbid")

    ids: list[UUID] | None = Field(default=None, max_length=5000)
    all: Literal["matching"] | None = None
    queue: str | None = Field(default=None, max_length=200)
    type: str | None = Field(default=None, max_length=200)
    after: str | None = Field(default=None, max_length=200)
    before: str | None = Field(default=None, max_length=200)


@parts.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
async def cancel(
    job_id: UUID, session: SessionDep, state: StateDep, principal: PrincipalDep
) -> HTMLResponse:
    row = await service.cancel(session, job_id, principal)
    if row.status == JobStatus.RUNNING:
        await state.watch.publish(terminal=[], changed=[row.id])
        return _done(f"Asked job {row.id} to stop.")
    await state.watch.publish(terminal=[row.id])
    return _done(f"Cancelled job {row.id}.")


@parts.post("/dlq/{job_id}/replay", response_class=HTMLResponse)
async def replay_one(
    job_id: UUID, session: SessionDep, dispatcher: DispatcherDep, principal: AdminDep
) -> HTMLResponse:
    row = await service.replay_one(session, dispatcher, job_id, principal)
    return _done(f"Replayed job {row.id}.")


@parts.post("/dlq/{job_id}/remove", response_class=HTMLResponse)
async def remove(job_id: UUID, session: SessionDep, principal: AdminDep) -> HTMLResponse:
    await service.remove_from_dlq(session, job_id, principal)
    return _done(f"Removed job {job_id} from the dead-letter queue.")


@parts.post("/dlq/replay", response_class=HTMLResponse)
async def replay_many(
    body: ReplayForm, session: SessionDep, dispatcher: DispatcherDep, principal: AdminDep
) -> HTMLResponse:
    """The selected jobs, or every dead job matching the filter (as ``POST /v1/dlq/replay``)."""
    if body.ids:
        n = await service.replay_many(
            session, dispatcher, principal, ids=body.ids, type=None, queue=None
        )
        return _done(f"Replayed {n} of {len(body.ids)} selected jobs.")
    if body.all != "matching":
        raise InvalidInput("select jobs, or replay all that match the filter")
    f = _filter(None, body.type, body.queue, body.after, body.before)
    n = await service.replay_many(
        session,
        dispatcher,
        principal,
        ids=None,
        type=f.type,
        queue=f.queue,
        created_after=f.created_after,
        created_before=f.created_before,
    )
    return _done(f"Replayed {n} dead job{'' if n == 1 else 's'} matching the filter.")


@parts.post("/queues/{queue}/{action}", response_class=HTMLResponse)
async def pause_queue(
    queue: QueueName,
    action: Annotated[str, PathParam(pattern="^(pause|resume)$")],
    session: SessionDep,
    state: StateDep,
    _: AdminDep,
) -> HTMLResponse:
    await flow.set_paused(session, queue, action == "pause")
    if state.snapshots is not None:  # this process's overview shows it at once
        state.snapshots.invalidate()
    return _done(f"Queue {queue} {'paused' if action == 'pause' else 'resumed'}.")


@parts.post("/schedules/{name}/{action}", response_class=HTMLResponse)
async def schedule_action(
    name: ScheduleName,
    action: Annotated[str, PathParam(pattern="^(pause|resume|trigger)$")],
    session: SessionDep,
    registry: RegistryDep,
    dispatcher: DispatcherDep,
    principal: AdminDep,
) -> HTMLResponse:
    if action == "trigger":
        row = await schedules.trigger(session, dispatcher, name, principal)
        return _done(f"Schedule {name} made job {row.id}.")
    await schedules.set_enabled(session, registry, name, action == "resume")
    return _done(f"Schedule {name} {action}d.")
