"""Running one attempt: the handler under its timeout, turned into an outcome. Never raises."""

from __future__ import annotations

import asyncio
import json
import traceback
from dataclasses import dataclass
from typing import Any

from app.db.models import JobRow
from app.errors import PermanentError
from app.jobs.registry import JobContext, JobType, Registry

MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000
MAX_RESULT_BYTES = 1 << 20


def storable(text: str) -> str:
    """Text PostgreSQL's jsonb accepts: no NUL characters, no lone surrogates."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _storable_json(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(k)): _storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_json(v) for v in value]
    return value


class ResultNotStorable(Exception):
    """The handler returned something that cannot be stored as the job's JSON result."""


@dataclass(frozen=True)
class Outcome:
    job_id: Any
    attempt: int
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None
    permanent: bool = False
    unknown_type: bool = False  # this worker has no handler for the job's type


def _error(job: JobRow, worker: str, message: str, kind: str, tb: str | None) -> dict[str, Any]:
    return {
        "attempt": job.attempts,
        "error": storable(message[:MAX_ERROR_CHARS]),
        "type": storable(kind),
        "traceback": storable(tb[-MAX_TRACEBACK_CHARS:]) if tb else None,
        "worker": worker,
    }


def _failure(job: JobRow, worker: str, exc: BaseException, *, permanent: bool) -> Outcome:
    tb = "".join(traceback.format_exception(exc, limit=20))
    message = str(exc) or type(exc).__name__
    error = _error(job, worker, message, type(exc).__name__, tb)
    return Outcome(job.id, job.attempts, ok=False, error=error, permanent=permanent)


def timeout_for(job: JobRow, job_type: JobType, default: float | None) -> float | None:
    """The attempt's time limit: the job's own, else its type's, else the default (None or
    0: no limit)."""
    return job.timeout_seconds or job_type.timeout_seconds or default or None


async def execute(
    job: JobRow, registry: Registry, worker: str, *, default_timeout: float | None = None
) -> Outcome:
    """Run the job's handler once; ``timeout`` and every exception become a failed outcome."""
    job_type = registry.find(job.type)
    if job_type is None:  # handed back for a while: see app/jobs/unknown_type.py
        error = _error(job, worker, f"unknown job type {job.type!r}", "UnknownType", None)
        return Outcome(job.id, job.attempts, ok=False, error=error, unknown_type=True)
    ctx = JobContext(job.id, job.type, job.queue, job.attempts, job.max_attempts, worker)
    deadline = asyncio.timeout(timeout_for(job, job_type, default_timeout))
    try:
        payload = job_type.model.model_validate(job.payload)
        async with deadline:
            result = _result(await job_type.handler(payload, ctx))
    except TimeoutError as exc:
        if deadline.expired():
            error = _error(job, worker, "timeout", "Timeout", None)
            return Outcome(job.id, job.attempts, ok=False, error=error)
        return _failure(job, worker, exc, permanent=False)
    except PermanentError as exc:
        return _failure(job, worker, exc, permanent=True)
    except Exception as exc:
        return _failure(job, worker, exc, permanent=False)
    return Outcome(job.id, job.attempts, ok=True, result=result)


def _result(value: Any) -> Any:
    """The handler's return value as storable JSON; NaN, Infinity and non-JSON types fail."""
    try:
        text = json.dumps(_storable_json(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ResultNotStorable(f"result is not JSON: {exc}") from exc
    if len(text) > MAX_RESULT_BYTES:
        raise ResultNotStorable(f"result is {len(text)} bytes; the limit is {MAX_RESULT_BYTES}")
    return json.loads(text)
