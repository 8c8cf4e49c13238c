"""Job types with limits declared in code, for the flow-control tests only (a worker that
loads them takes the claim under limits; the other tests' workers must not)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from app.jobs.registry import JobContext, job_type


class NapPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=0.0, ge=0, le=60)


@job_type("test.limited", concurrency=2)
async def limited(payload: NapPayload, ctx: JobContext) -> dict[str, str]:
    """At most two running at once, across all workers."""
    await asyncio.sleep(payload.seconds)
    return {"worker": ctx.worker}


@job_type("test.rated", rate="20/s", burst=5)
async def rated(payload: NapPayload, ctx: JobContext) -> dict[str, str]:
    """At most 20 starts a second (and 5 at once after an idle spell), across all workers."""
    await asyncio.sleep(payload.seconds)
    return {"worker": ctx.worker}
