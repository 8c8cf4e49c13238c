"""A job about to be inserted: :class:`NewJob`, built from a validated ``JobCreate``.

The submit path carries these typed values from validation to the insert statement; the
payload is serialised once (``payload_json``), and that same text is stored and answered.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
from pydantic import ValidationError

from app.errors import InvalidInput
from app.jobs import lifecycle
from app.jobs.ids import new_job_id
from app.jobs.principal import Principal
from app.jobs.registry import Registry
from app.jobs.schemas import JobCreate
from app.jobs.status import JobStatus


@dataclass(slots=True)  # not frozen: a frozen dataclass is built 8x slower, once per job
class NewJob:
    id: UUID
    type: str
    queue: str
    status: JobStatus  # queued, or scheduled when run_at is in the future
    priority: int
    payload_json: str  # the payload as its type normalised it, serialised once
    max_attempts: int
    timeout_seconds: float | None
    idempotency_key: str | None
    idempotency_scope: str
    request_hash: str | None  # set when idempotency_key is: what makes two requests "the same"
    owner: str | None
    run_at: datetime | None  # None: now (Postgres clock)
    unique_key: str | None = None  # debounce: one waiting job per (scope, type, unique_key)
    unique_for_seconds: float | None = None  # how long the key holds (None: until it starts)
    callback_url: str | None = None
    traceparent: str | None = None  # the submission's span, when tracing is on (ADR 0022)


def dump_json(value: Any) -> str:
    """Compact JSON, as the stdlib writes it. orjson is the fast path; integers beyond 64 bits
    (which orjson refuses) and non-finite floats (which orjson writes as ``null``, silently
    changing the value) go through the stdlib, which writes ``NaN``/``Infinity``: Postgres then
    refuses that text (class 22) and the request gets its 422, as for any unstorable value."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if b"null" in text and _non_finite(value):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.decode()


def _non_finite(value: Any) -> bool:
    """Whether a float NaN or infinity is anywhere inside ``value``."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def request_hash(item: JobCreate, payload: Any) -> str:
    """Every field as given, with the payload as its type normalises it and ``run_at`` in UTC
    (``delay_seconds`` is hashed as given, not resolved)."""
    # fields added later are hashed only when set, so that earlier keys keep their hashes
    later = {"callback_url"} if item.callback_url is None else set()
    body = item.model_dump(mode="json", exclude={"idempotency_key", "payload", "run_at", *later})
    body["payload"] = payload
    body["run_at"] = item.run_at.astimezone(UTC).isoformat() if item.run_at else None
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def parse(item: object) -> JobCreate:
    """Batch items arrive unvalidated, so that one 422 can name every bad index."""
    if isinstance(item, JobCreate):
        return item
    try:
        return JobCreate.model_validate(item)
    except ValidationError as exc:
        details = [{k: e[k] for k in ("loc", "msg", "type")} for e in exc.errors()]
        raise InvalidInput("invalid job", details=details) from exc


def new_job(
    item: JobCreate,
    registry: Registry,
    principal: Principal,
    now: datetime,
    traceparent: str | None = None,
) -> NewJob:
    """Validate the payload against its type and resolve the schedule; raises InvalidInput."""
    payload = registry.get(item.type).validate(item.payload).model_dump(mode="json")
    lifecycle.current().check_callback(item.callback_url)
    run_at = item.run_at
    if item.delay_seconds is not None:
        run_at = now + timedelta(seconds=item.delay_seconds)
    scheduled = run_at is not None and run_at > now
    key = item.idempotency_key
    return NewJob(
        id=new_job_id(),
        type=item.type,
        queue=item.queue,
        status=JobStatus.SCHEDULED if scheduled else JobStatus.QUEUED,
        priority=item.priority,
        payload_json=dump_json(payload),
        max_attempts=item.max_attempts,
        timeout_seconds=item.timeout_seconds,
        idempotency_key=key,
        idempotency_scope=principal.scope,
        request_hash=request_hash(item, payload) if key is not None else None,
        owner=principal.name,
        run_at=run_at,
        unique_key=item.unique_key,
        unique_for_seconds=item.unique_for_seconds,
        callback_url=item.callback_url,
        traceparent=traceparent,
    )
