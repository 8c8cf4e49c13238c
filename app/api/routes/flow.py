"""Flow controls (admin): pause and resume a queue; limits per queue and per job type."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.deps import AdminDep, RegistryDep, SessionDep
from app.api.errors import ERRORS
from app.flow import service
from app.flow.schemas import LimitsUpdate, QueueLimits, QueuePaused, TypeLimits
from app.jobs.schemas import QUEUE_PATTERN, TYPE_PATTERN

router = APIRouter(tags=["flow control"])
Queue = Annotated[str, Path(pattern=QUEUE_PATTERN)]
TypeName = Annotated[str, Path(pattern=TYPE_PATTERN)]


@router.post("/v1/queues/{queue}/pause", responses=ERRORS)
async def pause_queue(queue: Queue, session: SessionDep, _: AdminDep) -> QueuePaused:
    """Workers start no job of this queue from the next poll interval on; running jobs
    finish, submissions are accepted, scheduled and retrying jobs still become queued."""
    await service.set_paused(session, queue, True)
    return QueuePaused(queue=queue, paused=True)


@router.post("/v1/queues/{queue}/resume", responses=ERRORS)
async def resume_queue(queue: Queue, session: SessionDep, _: AdminDep) -> QueuePaused:
    """Workers start this queue's jobs again from the next poll interval on."""
    await service.set_paused(session, queue, False)
    return QueuePaused(queue=queue, paused=False)


@router.put("/v1/queues/{queue}/limits", responses=ERRORS)
async def set_queue_limits(
    queue: Queue, body: LimitsUpdate, session: SessionDep, _: AdminDep
) -> QueueLimits:
    """Limit the jobs of this queue, whatever their type, across all workers."""
    limits = body.to_limits()
    await service.set_limits(session, "queue", queue, limits)
    out = service.queue_limits(service.Control(False, limits))
    return QueueLimits(queue=queue, **out.model_dump())


@router.delete("/v1/queues/{queue}/limits", responses=ERRORS)
async def clear_queue_limits(queue: Queue, session: SessionDep, _: AdminDep) -> QueueLimits:
    """Lift every limit of this queue."""
    await service.set_limits(session, "queue", queue, None)
    return QueueLimits(queue=queue, **service.queue_limits(None).model_dump())


@router.put("/v1/job-types/{type}/limits", responses=ERRORS)
async def set_type_limits(
    type: TypeName, body: LimitsUpdate, session: SessionDep, registry: RegistryDep, _: AdminDep
) -> TypeLimits:
    """Replace the type's limits (those declared in code too) across all workers; a null
    field lifts that limit. 404 for a type no handler module registers."""
    job = service.job_type(registry, type)
    limits = body.to_limits()
    await service.set_limits(session, "type", type, limits)
    out = service.type_limits(job, service.Control(False, limits))
    return TypeLimits(type=type, **out.model_dump())


@router.delete("/v1/job-types/{type}/limits", responses=ERRORS)
async def clear_type_limits(
    type: TypeName, session: SessionDep, registry: RegistryDep, _: AdminDep
) -> TypeLimits:
    """Drop the override: the limits declared in code (if any) hold again."""
    job = service.job_type(registry, type)
    await service.set_limits(session, "type", type, None)
    return TypeLimits(type=type, **service.type_limits(job, None).model_dump())
