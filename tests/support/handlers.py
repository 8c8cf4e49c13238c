"""Job types used only by the tests (loaded with CONVEYOR_HANDLER_MODULES)."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, ConfigDict, Field

from app.errors import PermanentError
from app.jobs.registry import JobContext, job_type


class CrashPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exit_code: int = Field(default=137, ge=1, le=255)


@job_type("test.crash")
async def crash(payload: CrashPayload, ctx: JobContext) -> None:
    """Kills the worker process outright, as a segfault or an OOM kill would."""
    os._exit(payload.exit_code)


class SlowPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=600)


@job_type("test.slow", timeout_seconds=1.0)
async def slow(payload: SlowPayload, ctx: JobContext) -> dict[str, int]:
    """Sleeps; its type timeout is 1 s, so anything longer fails with `timeout`."""
    await asyncio.sleep(payload.seconds)
    return {"attempt": ctx.attempt}


class PermanentPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(default="permanent failure", max_length=200)


@job_type("test.permanent")
async def permanent(payload: PermanentPayload, ctx: JobContext) -> None:
    """Raises the permanent-failure error: no attempt after this one."""
    raise PermanentError(payload.message)


class NapPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=600)
    until_attempt: int = Field(default=1000, ge=0)


@job_type("test.nap")
async def nap(payload: NapPayload, ctx: JobContext) -> dict[str, object]:
    """Sleeps while attempt <= until_attempt; the result names the worker and attempt."""
    if ctx.attempt <= payload.until_attempt:
        await asyncio.sleep(payload.seconds)
    return {"worker": ctx.worker, "attempt": ctx.attempt}


class GatePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=500)


@job_type("test.gate")
async def gate(payload: GatePayload, ctx: JobContext) -> dict[str, int]:
    """Fails with ``gate closed`` until the file at ``path`` exists (a test opens it)."""
    if not os.path.exists(payload.path):
        raise RuntimeError("gate closed")
    return {"attempt": ctx.attempt}
