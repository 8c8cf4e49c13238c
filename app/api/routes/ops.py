"""Operations: queues, workers, job types, health, readiness, metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import PrincipalDep, SessionDep, StateDep
from app.api.errors import ERRORS
from app.db.engine import ping
from app.flow import service as flow
from app.jobs import queries
from app.jobs.contracts import result_schema
from app.jobs.schemas import (
    Health,
    JobTypeList,
    JobTypeOut,
    QueueList,
    QueueStats,
    WorkerList,
    WorkerOut,
)
from app.observe import exposition

router = APIRouter(tags=["operations"])  # /v1: needs a key, rate limited
public = APIRouter(tags=["operations"])  # health, readiness, metrics: open
READY_TIMEOUT = 1.5


@router.get("/v1/queues", responses=ERRORS)
async def queues(session: SessionDep, state: StateDep, principal: PrincipalDep) -> QueueList:
    """Per queue (those with unfinished or dead jobs, a live worker, a pause or limits):
    waiting, running, scheduled, retrying and dead (in the DLQ) counts, entries pending in
    its streams, whether it is paused, and its limits."""
    counts = await queries.queue_counts(session)
    served = await queries.live_workers(session, state.settings.claim_idle_seconds)
    controls = await flow.controls(session, "queue")
    names = sorted(set(counts).union(controls, *(w.queues for w in served)))
    keys, partitions = state.stream.keys, state.settings.partitions
    pending = await state.stream.pending_counts(
        [s for q in names for s in keys.queue_streams(q, partitions)]
    )
    per_queue = len(keys.queue_streams("x", partitions))
    items = []
    for i, name in enumerate(names):
        c = counts.get(name, {})
        items.append(
            QueueStats(
                queue=name,
                waiting=c.get("queued", 0),
                running=c.get("running", 0),
                scheduled=c.get("scheduled", 0),
                retrying=c.get("retrying", 0),
                dead=c.get("dead", 0),
                pending=sum(pending[i * per_queue : (i + 1) * per_queue]),
                paused=name in controls and controls[name].paused,
                limits=flow.queue_limits(controls.get(name)),
            )
        )
    return QueueList(items=items)


@router.get("/v1/workers", responses=ERRORS)
async def workers(session: SessionDep, state: StateDep, principal: PrincipalDep) -> WorkerList:
    """Workers whose heartbeat is recent."""
    rows = await queries.live_workers(session, state.settings.claim_idle_seconds)
    return WorkerList(items=[WorkerOut.model_validate(r, context=principal.view) for r in rows])


@router.get("/v1/job-types", responses=ERRORS)
async def job_types(state: StateDep, session: SessionDep, principal: PrincipalDep) -> JobTypeList:
    """Every registered job type with the JSON Schema its payload must match, that of its
    result, and its limits in force."""
    controls = await flow.controls(session, "type")
    return JobTypeList(
        items=[
            JobTypeOut(
                name=t.name,
                description=t.description,
                timeout_seconds=t.timeout_seconds,
                payload_schema=t.json_schema(),
                limits=flow.type_limits(t, controls.get(t.name)),
                result_schema=result_schema(t),
            )
            for t in state.registry.all()
        ]
    )


@public.get("/healthz")
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


async def _check(coro_factory: object) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await coro_factory  # type: ignore[misc]
        return True
    except Exception:
        return False


@public.get("/readyz", responses={503: {"model": Health}})
async def readyz(state: StateDep) -> Response:
    """200 when Postgres and Redis both answer; 503 otherwise."""

    postgres, redis = await asyncio.gather(_check(ping(state.engine)), _check(state.stream.ping()))
    ok = postgres and redis
    body = Health(status="ok" if ok else "unavailable", postgres=postgres, redis=redis)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@public.get("/metrics", response_class=Response, responses={503: ERRORS[503]})
async def metrics(state: StateDep) -> Response:
    """Prometheus text format: every process's counters and histograms (shared in Redis),
    and gauges from a snapshot at most CONVEYOR_METRICS_SNAPSHOT_SECONDS old."""
    assert state.snapshots is not None
    body, content_type = await exposition.scrape(state.stream, state.snapshots)
    return Response(body, media_type=content_type)
