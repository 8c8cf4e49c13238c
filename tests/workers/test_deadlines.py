"""Attempt time limits armed when they draw near (workers/deadlines.py): an attempt that ends
early never makes a timer, one that runs long still times out on time, through the worker's
own ``execute``."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from pydantic import BaseModel

from app.jobs.attempts import Claim
from app.jobs.registry import JobContext, JobType, Registry
from workers.deadlines import Deadlines
from workers.execution import execute

TICK = 0.05


class Sleep(BaseModel):
    seconds: float


async def _sleep(payload: Sleep, ctx: JobContext) -> dict[str, float]:
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


def _registry() -> Registry:
    registry = Registry()
    registry.register(JobType("t.sleep", Sleep, _sleep, None, "sleeps"))
    return registry


def _claim(seconds: float, timeout: float) -> Claim:
    return Claim(
        uuid.uuid4(), 1, 1, "t.sleep", "q", 3, timeout, Sleep(seconds=seconds).model_dump_json()
    )


async def test_a_long_limit_is_armed_only_when_it_draws_near() -> None:
    deadlines = Deadlines(tick=TICK)
    sweeping = asyncio.create_task(deadlines.run())
    try:
        began = time.monotonic()
        timeout = deadlines.timeout(1.0)
        with pytest.raises(TimeoutError):
            async with timeout:
                assert timeout.when() is None and len(deadlines) == 1  # no timer yet
                await asyncio.sleep(0.3)
                assert timeout.when() is None  # 0.7 s left: still more than two ticks
                await asyncio.sleep(5)
        assert timeout.expired() and deadlines.armed == 1 and len(deadlines) == 0
        assert 0.95 <= time.monotonic() - began <= 1.3  # at the 1 s limit, not a tick late
        assert deadlines.timeout(2 * TICK).when() is not None  # short: armed at once
    finally:
        sweeping.cancel()


async def test_attempts_that_end_early_make_no_timer_and_late_ones_time_out() -> None:
    deadlines = Deadlines(tick=TICK)
    sweeping = asyncio.create_task(deadlines.run())
    registry = _registry()
    try:
        quick = await asyncio.gather(
            *(execute(_claim(0.01, 30), registry, "w", deadlines=deadlines) for _ in range(50))
        )
        assert all(c.error is None and c.result == '{"slept": 0.01}' for c in quick)
        assert (deadlines.armed, len(deadlines)) == (0, 0)

        began = time.monotonic()
        slow = await execute(_claim(5, 0.4), registry, "w", deadlines=deadlines)
        assert slow.error is not None and slow.error["type"] == "Timeout"
        assert 0.35 <= time.monotonic() - began <= 0.8
        assert (deadlines.armed, len(deadlines)) == (1, 0)

        bad = Claim(uuid.uuid4(), 1, 1, "t.sleep", "q", 3, 30, '{"seconds": "x"}')
        failed = await execute(bad, registry, "w", deadlines=deadlines)
        assert failed.error is not None and len(deadlines) == 0  # never entered, still gone
    finally:
        sweeping.cancel()
