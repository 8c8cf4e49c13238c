"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.flow.schemas import LimitsOut
from app.jobs import lifecycle
from app.jobs.status import JobStatus
from app.outbound.destinations import http_url

QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_DELAY_SECONDS = 366 * 24 * 3600
MAX_BATCH = 1000


_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")


def iso_only(value: Any) -> Any:
    """An ISO 8601 date-time, as documented; not a number read as a Unix timestamp."""
    if isinstance(value, datetime):
        return value
    if not (isinstance(value, str) and _ISO_DATETIME.match(value)):
        raise ValueError("expected an ISO 8601 date-time with a time zone")
    return value


def to_utc(value: datetime) -> datetime:
    """UTC, so PostgreSQL never sees an offset beyond its ±15:59 or a year past 9999."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime out of range") from None


UtcDatetime = Annotated[AwareDatetime, BeforeValidator(iso_only), AfterValidator(to_utc)]


class JobCreate(BaseModel):
    """A job to submit. `payload` must match the registered schema of `type`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"type": "demo.echo", "payload": {"hello": "world"}}]},
    )

    type: str = Field(pattern=TYPE_PATTERN, description="A registered job type.")
    payload: dict[str, Any] = Field(default_factory=dict)
    queue: str = Field(default="default", pattern=QUEUE_PATTERN)
    # numbers are strict: true, "3" or 3.5 where a number is documented is a 422, not a guess
    priority: int = Field(
        default=0,
        strict=True,
        ge=-1000,
        le=1000,
        description=(
            "Higher starts first, in three bands: > 0 is high, 0 default, < 0 low. In a queue,"
            " a waiting job of a higher band starts before any job of a lower band; within a"
            " band, first in first out (1 and 1000 are both simply high)."
        ),
    )
    max_attempts: int = Field(default=3, strict=True, ge=1, le=100)
    run_at: UtcDatetime | None = Field(default=None, description="Not started before this.")
    delay_seconds: float | None = Field(
        default=None, strict=True, ge=0, le=MAX_DELAY_SECONDS, allow_inf_nan=False
    )
    timeout_seconds: float | None = Field(
        default=None, strict=True, gt=0, le=86400, allow_inf_nan=False
    )
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    unique_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description=(
            "Debounce: while a job of the same type with this key (submitted with the same API"
            " key) is still waiting to start, a submission returns that job (200) instead of"
            " making another."
        ),
    )
    unique_for_seconds: float | None = Field(
        default=None,
        strict=True,
        gt=0,
        le=MAX_DELAY_SECONDS,
        allow_inf_nan=False,
        description="How long the key holds after the first submission (default: until it starts).",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description=(
            "POSTed once the job is succeeded, dead or cancelled (Standard Webhooks signature)."
            " Its host must be in CONVEYOR_HTTP_ALLOWED_HOSTS, as for http.request."
        ),
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_http(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @model_validator(mode="after")
    def _one_schedule(self) -> JobCreate:
        if self.run_at is not None and self.delay_seconds is not None:
            raise ValueError("give run_at or delay_seconds, not both")
        if self.unique_for_seconds is not None and self.unique_key is None:
            raise ValueError("unique_for_seconds needs a unique_key")
        return self


# A batch item is a JobCreate (and documented so), validated one by one in the service, so
# that a 422 names every bad index, whether its fault is a field or the payload's schema.
BatchItem = Annotated[Any, WithJsonSchema({"$ref": "#/components/schemas/JobCreate"})]


class JobBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[BatchItem] = Field(
        min_length=1, max_length=MAX_BATCH, description="Up to 1000 jobs, all or none."
    )


def internal(value: Any, info: ValidationInfo) -> Any:
    """Tracebacks and worker names, hosts and pids are shown only when the validation context
    says so (admin keys, or auth off); without a context they are left out."""
    return value if (info.context or {}).get("internals") else None


ADMIN_ONLY = "Admin keys only (null for producer keys)."


class JobError(BaseModel):
    """One failed attempt."""

    attempt: int
    error: str
    at: datetime
    type: str | None = None
    traceback: str | None = Field(default=None, description=ADMIN_ONLY)
    worker: str | None = Field(default=None, description=ADMIN_ONLY)

    _internal = field_validator("traceback", "worker")(internal)


class JobProgress(BaseModel):
    """The latest progress a running attempt reported (``await ctx.progress(...)``)."""

    value: float = Field(ge=0, le=1)
    message: str | None = None


class CallbackState(BaseModel):
    """Delivery of the completion callback: ``waiting`` until the job finishes, then
    ``pending`` (being delivered, retried with backoff), ``delivered`` or ``failed``."""

    status: Literal["waiting", "pending", "delivered", "failed"]
    attempts: int
    last_error: str | None


def _callback(values: Mapping[str, Any]) -> dict[str, Any] | None:
    if values.get("callback_url") is None:
        return None
    return {
        "status": values.get("callback_status") or "waiting",
        "attempts": values.get("callback_attempts") or 0,
        "last_error": values.get("callback_last_error"),
    }


class Job(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    type: str
    queue: str
    status: JobStatus
    priority: int
    payload: dict[str, Any]
    result: Any = None
    attempts: int
    max_attempts: int
    errors: list[JobError]
    idempotency_key: str | None
    timeout_seconds: float | None = None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    schedule: str | None = Field(default=None, description="The schedule that made the job.")
    scheduled_for: datetime | None = Field(
        default=None, description="The schedule's slot it was made for (null for a trigger)."
    )
    cancel_requested_at: datetime | None = Field(
        default=None, description="When a cancel was asked of the job while it ran."
    )
    unique_key: str | None = Field(
        default=None, description="Debounce key it was submitted with (see JobCreate)."
    )
    progress: JobProgress | None = Field(
        default=None,
        description="The latest progress its handler reported (cleared when an attempt starts).",
    )
    callback_url: str | None = None
    callback: CallbackState | None = Field(
        default=None, description="Delivery of the completion callback (null without one)."
    )
    result_expires_at: datetime | None = Field(
        default=None,
        description=(
            "When the finished job, its result and its events will be deleted (retention);"
            " null while it is unfinished or when it is kept forever."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, data: Any) -> Any:
        """``callback`` and ``result_expires_at`` from the row's columns."""
        if isinstance(data, Mapping):
            values = dict(data)
        else:  # an ORM row: one attribute read per name (hasattr + getattr read each twice)
            values = {}
            for name in (*cls.model_fields, *_CALLBACK_COLUMNS):
                value = getattr(data, name, _ABSENT)
                if value is not _ABSENT:
                    values[name] = value
        if "callback" not in values:
            values["callback"] = _callback(values)
        if "result_expires_at" not in values and values.get("status") is not None:
            policy = lifecycle.current().retention
            status = JobStatus(values["status"])
            values["result_expires_at"] = policy.expires_at(
                status, str(values.get("type")), values.get("finished_at")
            )
        return values


_CALLBACK_COLUMNS = ("callback_status", "callback_attempts", "callback_last_error")
_ABSENT = object()


class JobBatch(BaseModel):
    jobs: list[Job]


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    event: str
    attempt: int
    worker: str | None = Field(description=ADMIN_ONLY)
    actor: str | None = Field(
        description="The API key id (or worker) that caused it; never derived from a secret."
    )

    _internal = field_validator("worker")(internal)

    @field_validator("actor")
    @classmethod
    def _worker_actor(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A lost worker's attempt is failed by another worker, whose name is the actor."""
        if info.data.get("event") in ("reclaimed", "dead"):
            return internal(value, info)  # type: ignore[no-any-return]
        return value


class ReplayRequest(BaseModel):
    """Replay dead jobs by ids, or every dead job matching a filter."""

    model_config = ConfigDict(extra="forbid")

    # 5000 ids (about 200 KB) fit in the default body limit, so a longer list is a 422, not a 413
    ids: list[UUID] | None = Field(default=None, max_length=5000)
    type: str | None = Field(default=None, pattern=TYPE_PATTERN)
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    created_after: UtcDatetime | None = Field(
        default=None, description="Only jobs created after this (with a zone)."
    )
    created_before: UtcDatetime | None = Field(
        default=None, description="Only jobs created before this (with a zone)."
    )

    @model_validator(mode="after")
    def _some_selector(self) -> ReplayRequest:
        filters = (self.type, self.queue, self.created_after, self.created_before)
        if self.ids is None and all(f is None for f in filters):
            raise ValueError("give ids, or a filter: type, queue, created_after, created_before")
        return self


class ReplayResult(BaseModel):
    replayed: int


class QueueStats(BaseModel):
    queue: str
    waiting: int
    running: int
    scheduled: int
    retrying: int
    dead: int
    pending: int = Field(description="Stream entries delivered to a worker and not yet acked.")
    paused: bool = Field(default=False, description="Workers start none of its jobs.")
    limits: LimitsOut | None = Field(default=None, description="The queue's limits in force.")


class QueueList(BaseModel):
    items: list[QueueStats]


class WorkerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    host: str | None = Field(description=ADMIN_ONLY)
    pid: int | None = Field(description=ADMIN_ONLY)
    queues: list[str]
    concurrency: int
    in_flight: int
    started_at: datetime
    last_seen_at: datetime

    _internal = field_validator("host", "pid")(internal)


class WorkerList(BaseModel):
    items: list[WorkerOut]


class JobTypeOut(BaseModel):
    name: str
    description: str
    timeout_seconds: float | None
    payload_schema: dict[str, Any]
    limits: LimitsOut | None = Field(default=None, description="The type's limits in force.")
    result_schema: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON Schema of a succeeded job's `result`, from the handler's return"
        " annotation (`{}`: any JSON).",
    )


class JobTypeList(BaseModel):
    items: list[JobTypeOut]


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: str = Field(description="A stable machine-readable code.")
    message: str
    details: Any = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    postgres: bool | None = None
    redis: bool | None = None
