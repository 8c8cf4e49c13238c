"""Running one attempt: the handler under its timeout, turned into a completion. Never raises."""

from __future__ import annotations

import asyncio
import json
import traceback
from typing import Any

from app.errors import PermanentError, RetryLater
from app.jobs.attempts import Claim, Completion, ErrorRecord
from app.jobs.registry import JobContext, JobType, ProgressSink, Registry
from workers.deadlines import Deadlines

MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000
MAX_RESULT_BYTES = 1 << 20
_ENCODER = json.JSONEncoder(allow_nan=False)  # one encoder, not one per result


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


def error_record(
    attempt: int, worker: str, message: str, kind: str, tb: str | None = None
) -> ErrorRecord:
    """The one way to build an entry of a job's error history: bounded, storable text."""
    return {
        "attempt": attempt,
        "error": storable(message[:MAX_ERROR_CHARS]),
        "type": storable(kind),
        "traceback": storable(tb[-MAX_TRACEBACK_CHARS:]) if tb else None,
        "worker": worker,
    }


def failed(job: Claim, error: ErrorRecord, *, permanent: bool = False) -> Completion:
    return Completion(job.id, job.token, None, error, permanent)


def _failure(job: Claim, worker: str, exc: BaseException, *, permanent: bool) -> Completion:
    tb = "".join(traceback.format_exception(exc, limit=20))
    message = str(exc) or type(exc).__name__
    error = error_record(job.attempt, worker, message, type(exc).__name__, tb)
    return failed(job, error, permanent=permanent)


def timeout_for(job: Claim, job_type: JobType, default: float | None) -> float | None:
    """The attempt's time limit: the job's own, else its type's, else the default (None or
    0: no limit)."""
    return job.timeout_seconds or job_type.timeout_seconds or default or None


def deferred(job: Claim, worker: str, exc: RetryLater) -> Completion:
    """A RetryLater: wait ``exc.seconds`` without spending an attempt. The error record is
    what the history shows if the job's deferral budget is spent (then it is a failure)."""
    error = error_record(job.attempt, worker, str(exc), "RetryLater")
    return Completion(job.id, job.token, None, error, defer_seconds=exc.seconds)


def cancelled(job: Claim) -> Completion:
    """The attempt was stopped because a cancel was requested."""
    return Completion(job.id, job.token, None, cancelled=True)


async def execute(
    job: Claim,
    registry: Registry,
    worker: str,
    *,
    default_timeout: float | None = None,
    cancel: asyncio.Event | None = None,
    progress: ProgressSink | None = None,
    deadlines: Deadlines | None = None,
) -> Completion:
    """Run the job's handler once; ``timeout`` and every exception become a failed attempt,
    ``RetryLater`` a deferral. ``cancel``: the event a cancel request sets (``ctx.cancelled``).
    ``deadlines``: the worker's, which arms the time limit only when it draws near (else it is
    armed at once). A cancellation of the calling task propagates (the caller decides what it
    meant)."""
    job_type = registry.find(job.type)
    if job_type is None:  # handed back for a while: see app/jobs/unknown_type.py
        message = f"unknown job type {job.type!r}"
        error = error_record(job.attempt, worker, message, "UnknownType")
        return Completion(job.id, job.token, None, error, unknown_type=True)
    ctx = JobContext(
        job.id,
        job.type,
        job.queue,
        job.attempt,
        job.max_attempts,
        worker,
        cancel_event=cancel if cancel is not None else asyncio.Event(),
        progress_sink=progress,
    )
    limit = timeout_for(job, job_type, default_timeout)
    deadline = asyncio.timeout(limit) if deadlines is None else deadlines.timeout(limit)
    try:
        payload = job_type.model.model_validate_json(job.payload)
        async with deadline:
            result = _result(await job_type.handler(payload, ctx))
    except TimeoutError as exc:
        if deadline.expired():
            return failed(job, error_record(job.attempt, worker, "timeout", "Timeout"))
        return _failure(job, worker, exc, permanent=False)
    except PermanentError as exc:
        return _failure(job, worker, exc, permanent=True)
    except RetryLater as exc:
        return deferred(job, worker, exc)
    except Exception as exc:
        return _failure(job, worker, exc, permanent=False)
    finally:
        if deadlines is not None:
            deadlines.done(deadline)
    return Completion(job.id, job.token, result)


def outcome_of(completion: Completion) -> tuple[str, str | None]:
    """How an attempt ended, as its span shows it: a name, and the error if it failed."""
    error = completion.error
    if completion.cancelled:
        return "cancelled", None
    if completion.unknown_type:
        return "unknown_type", None
    if completion.defer_seconds is not None:
        return "deferred", None
    if error is None:
        return "succeeded", None
    if error["type"] == "Timeout":
        return "timeout", "timeout"
    return "failed", error["error"]


def _result(value: Any) -> str:
    """The handler's return value as storable JSON text; NaN, Infinity and non-JSON types
    fail."""
    try:
        text = _ENCODER.encode(_storable_json(value))
    except (TypeError, ValueError) as exc:
        raise ResultNotStorable(f"result is not JSON: {exc}") from exc
    if len(text) > MAX_RESULT_BYTES:
        raise ResultNotStorable(f"result is {len(text)} bytes; the limit is {MAX_RESULT_BYTES}")
    return text
