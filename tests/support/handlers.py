"""Job types used only by the tests (loaded with CONVEYOR_HANDLER_MODULES)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from app.db.url import asyncpg_dsn
from app.errors import PermanentError, RetryLater
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


@job_type("test.patient", timeout_seconds=5.0)
async def patient(payload: NapPayload, ctx: JobContext) -> dict[str, object]:
    """As test.nap, with a type timeout of 5 s (above the default the timeout tests set)."""
    await asyncio.sleep(payload.seconds)
    return {"worker": ctx.worker, "attempt": ctx.attempt}


@job_type("test.stubborn")
async def stubborn(payload: NapPayload, ctx: JobContext) -> dict[str, object]:
    """Sleeps ``seconds`` and swallows every cancellation meanwhile (shutdown, timeout): a
    handler that ignores ``CancelledError``, as careless ``except BaseException`` code does."""
    loop = asyncio.get_running_loop()
    end = loop.time() + payload.seconds
    while (left := end - loop.time()) > 0:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(left)
    return {"worker": ctx.worker, "attempt": ctx.attempt}


@job_type("test.block")
async def block(payload: NapPayload, ctx: JobContext) -> dict[str, object]:
    """Sleeps ``seconds`` with ``time.sleep``: synchronous code that holds the event loop."""
    time.sleep(payload.seconds)
    return {"worker": ctx.worker, "attempt": ctx.attempt}


# -- fault-injection suite (tests/faults): every execution leaves a row in `fault_effects` --------

_effect_pools: dict[str, asyncpg.Pool] = {}


async def _effects_pool() -> asyncpg.Pool:
    """One small pool per process, to the database in ``CONVEYOR_DATABASE_URL``."""
    url = os.environ["CONVEYOR_DATABASE_URL"]
    pool = _effect_pools.get(url)
    if pool is None:
        dsn = asyncpg_dsn(url)
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=4, timeout=5)
        _effect_pools[url] = pool
    return pool


async def record_effect(ctx: JobContext) -> None:
    """The handler's side effect: one row per execution (no unique constraint)."""
    pool = await _effects_pool()
    await pool.execute(
        "INSERT INTO fault_effects (job_id, attempt, worker, at) VALUES ($1, $2, $3, now())",
        ctx.job_id,
        ctx.attempt,
        ctx.worker,
    )


class EffectPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sleep_ms: int = Field(default=5, ge=0, le=60000)


@job_type("test.effect")
async def effect(payload: EffectPayload, ctx: JobContext) -> dict[str, int]:
    """Sleeps ``sleep_ms``, then records its execution in ``fault_effects``."""
    await asyncio.sleep(payload.sleep_ms / 1000)
    await record_effect(ctx)
    return {"attempt": ctx.attempt}


class EffectCrashPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    crash_attempts: int = Field(default=100, ge=0, le=100)


@job_type("test.effect_crash")
async def effect_crash(payload: EffectCrashPayload, ctx: JobContext) -> dict[str, int]:
    """Kills the worker (``os._exit``) while attempt <= ``crash_attempts``; then as test.effect."""
    if ctx.attempt <= payload.crash_attempts:
        os._exit(137)
    await record_effect(ctx)
    return {"attempt": ctx.attempt}


class EffectFailPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(default="poison", max_length=200)


@job_type("test.effect_fail")
async def effect_fail(payload: EffectFailPayload, ctx: JobContext) -> None:
    """Always raises (a retryable error): a poison job that ends dead after its attempts."""
    raise RuntimeError(payload.message)


class GatePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=500)


@job_type("test.gate")
async def gate(payload: GatePayload, ctx: JobContext) -> dict[str, int]:
    """Fails with ``gate closed`` until the file at ``path`` exists (a test opens it)."""
    if not os.path.exists(payload.path):
        raise RuntimeError("gate closed")
    return {"attempt": ctx.attempt}


class WeirdPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(nul|surrogate|nan|object|nul_error)$")


@job_type("test.weird_result")
async def weird_result(payload: WeirdPayload, ctx: JobContext) -> object:
    """Returns (or raises with) values PostgreSQL's jsonb would refuse as they are."""
    if payload.kind == "nul":
        return {"text": "a\x00b", "k\x00": 1}
    if payload.kind == "surrogate":
        return {"text": "x\ud800y"}
    if payload.kind == "nan":
        return {"n": float("nan")}
    if payload.kind == "nul_error":
        raise ValueError("bad\x00byte \udc80")
    return object()


class MeasurePayload(BaseModel):
    """A plain ``float`` field, as job types commonly declare one: in lax mode pydantic also
    accepts the strings "NaN" and "Infinity" for it, which PostgreSQL's jsonb refuses."""

    value: float


@job_type("test.measure")
async def measure(payload: MeasurePayload, ctx: JobContext) -> dict[str, float]:
    """Returns the value it was given."""
    return {"value": payload.value}


class HugeNumberPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digits: int = Field(ge=1, le=200_000)


@job_type("test.huge_number")
async def huge_number(payload: HugeNumberPayload, ctx: JobContext) -> dict[str, int]:
    """Returns 10**digits: valid JSON (with PYTHONINTMAXSTRDIGITS=0), but over 131072 digits
    PostgreSQL's numeric (and so jsonb) refuses it: "value overflows numeric format"."""
    return {"n": 10**payload.digits}


# -- cancelling running jobs and RetryLater (tests/api/test_cancel_running.py, test_defer.py) ---


class CancellablePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=500)
    seconds: float = Field(default=120, ge=0, le=600)
    swallow: bool = False  # catch the cancellation, clean up, and return a value


@job_type("test.cancellable")
async def cancellable(payload: CancellablePayload, ctx: JobContext) -> dict[str, object]:
    """Loops in short sleeps, checking ``ctx.cancelled``; on the cancellation it writes what
    it saw to ``path`` (its "clean-up"), then re-raises it or, with ``swallow``, returns."""
    loop = asyncio.get_running_loop()
    end = loop.time() + payload.seconds
    with open(payload.path + ".started", "w") as f:
        f.write(str(ctx.attempt))
    try:
        while loop.time() < end and not ctx.cancelled:
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        with open(payload.path, "w") as f:
            f.write(f"CancelledError ctx.cancelled={ctx.cancelled}")
        if not payload.swallow:
            raise
        return {"swallowed": True}
    return {"finished": True, "ctx.cancelled": ctx.cancelled}


class DeferPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=0.5, ge=0, le=600)
    times: int = Field(default=2, ge=0, le=1000)  # defer on the first `times` runs


_deferred_runs: dict[str, int] = {}


@job_type("test.defer")
async def defer(payload: DeferPayload, ctx: JobContext) -> dict[str, object]:
    """Raises ``RetryLater(seconds)`` on its first ``times`` runs (counted per job, in the
    worker process), then succeeds with the attempt it ran in and how many runs it took."""
    key = str(ctx.job_id)
    _deferred_runs[key] = _deferred_runs.get(key, 0) + 1
    if _deferred_runs[key] <= payload.times:
        raise RetryLater(payload.seconds)
    return {"attempt": ctx.attempt, "runs": _deferred_runs[key]}


class ProgressPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=4, ge=1, le=100_000)
    pause: float = Field(default=0.5, ge=0, le=60)


@job_type("test.progress")
async def report_progress(payload: ProgressPayload, ctx: JobContext) -> dict[str, int]:
    """Reports ``step i of n`` after each pause; the result counts the steps."""
    for step in range(1, payload.steps + 1):
        await asyncio.sleep(payload.pause)
        await ctx.progress(step / payload.steps, f"step {step} of {payload.steps}")
    return {"steps": payload.steps}
