"""A job type with a schedule declared in code; only the worker processes of the sync test
load it (``CONVEYOR_HANDLER_MODULES``), with the declaration taken from the environment."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict

from app.jobs.registry import JobContext, job_type
from app.schedules.spec import Periodic

NAME = "test.periodic"


class Tick(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = "tick"


@job_type(
    NAME,
    schedule=Periodic(
        os.environ.get("TEST_PERIODIC_CRON", "@every 1h"),
        queue=os.environ.get("TEST_PERIODIC_QUEUE", "default"),
    ),
)
async def tick(payload: Tick, ctx: JobContext) -> dict[str, str]:
    """Runs by itself on its schedule."""
    return {"label": payload.label}
