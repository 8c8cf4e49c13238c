"""The ``demo.*`` job types from the contract."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, RootModel

from app.jobs.registry import JobContext, job_type


class EchoPayload(RootModel[dict[str, Any]]):
    """Any JSON object."""


class SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=3600, allow_inf_nan=False)


class FailPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_times: int | None = Field(default=None, ge=0)
    fail_until: AwareDatetime | None = None
    message: str = Field(default="demo failure", max_length=2000)


class DemoFailure(Exception):
    """What ``demo.fail`` raises."""


@job_type("demo.echo")
async def echo(payload: EchoPayload, ctx: JobContext) -> dict[str, Any]:
    """Returns the payload as the result."""
    return payload.root


@job_type("demo.sleep", timeout_seconds=3660)  # its longest sleep fits the default timeout
async def sleep(payload: SleepPayload, ctx: JobContext) -> dict[str, float]:
    """Sleeps for `seconds`, then returns `{"slept": seconds}`."""
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


@job_type("demo.fail")
async def fail(payload: FailPayload, ctx: JobContext) -> dict[str, int]:
    """Fails while attempt <= fail_times or now < fail_until (always, when both are null)."""
    failing = payload.fail_times is None and payload.fail_until is None
    if payload.fail_times is not None and ctx.attempt <= payload.fail_times:
        failing = True
    if payload.fail_until is not None and datetime.now(UTC) < payload.fail_until:
        failing = True
    if failing:
        raise DemoFailure(payload.message)
    return {"attempt": ctx.attempt}
