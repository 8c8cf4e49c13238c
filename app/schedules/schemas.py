"""Request and response bodies of ``/v1/schedules``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.jobs.schemas import QUEUE_PATTERN, TYPE_PATTERN

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
Missed = Literal["skip", "run_once"]

_CRON = (
    "5-field cron (minute hour day-of-month month day-of-week, e.g. `*/5 * * * *`),"
    " an alias (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`), or"
    " `@every <n>s|m|h` (slots on multiples of the interval since the Unix epoch)."
)
_MISSED = (
    "Slots more than CONVEYOR_SCHEDULE_GRACE_SECONDS late (nothing was running) are missed:"
    " `skip` drops them, `run_once` makes one job for them all (its `scheduled_for` is the"
    " latest missed slot)."
)


class ScheduleCreate(BaseModel):
    """A periodic job. `payload` must match the registered schema of `type`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "nightly-report", "cron": "0 3 * * *", "timezone": "Europe/Paris",
                 "type": "demo.echo", "payload": {"report": "daily"}}
            ]
        },
    )  # fmt: skip

    name: str = Field(pattern=NAME_PATTERN)
    cron: str = Field(min_length=1, max_length=200, description=_CRON)
    timezone: str = Field(default="UTC", min_length=1, max_length=64, description="IANA name.")
    type: str = Field(pattern=TYPE_PATTERN, description="A registered job type.")
    payload: dict[str, Any] = Field(default_factory=dict)
    queue: str = Field(default="default", pattern=QUEUE_PATTERN)
    priority: int = Field(default=0, strict=True, ge=-1000, le=1000)
    enabled: bool = Field(default=True, strict=True)
    missed: Missed = Field(default="skip", description=_MISSED)


class ScheduleUpdate(BaseModel):
    """Fields to change; the others keep their values. The result is validated as a whole."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(default=None, min_length=1, max_length=200, description=_CRON)
    timezone: str | None = Field(default=None, min_length=1, max_length=64)
    type: str | None = Field(default=None, pattern=TYPE_PATTERN)
    payload: dict[str, Any] | None = None
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    priority: int | None = Field(default=None, strict=True, ge=-1000, le=1000)
    enabled: bool | None = Field(default=None, strict=True)
    missed: Missed | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> ScheduleUpdate:
        nulls = sorted(f for f in self.model_fields_set if getattr(self, f) is None)
        if nulls:
            raise ValueError(f"these fields cannot be null: {', '.join(nulls)}")
        return self


class Schedule(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    cron: str
    timezone: str
    type: str
    payload: dict[str, Any]
    queue: str
    priority: int
    enabled: bool
    missed: Missed
    next_run_at: datetime | None = Field(description="The next slot; null while paused.")
    last_run_at: datetime | None = Field(
        description="The slot of the latest job made (for a trigger, its time)."
    )
    source: Literal["api", "code"] = Field(
        description="`code`: declared with `@job_type(..., schedule=...)` and synced at worker"
        " start."
    )
    created_at: datetime
    updated_at: datetime


class SchedulePage(BaseModel):
    items: list[Schedule]
    next_cursor: str | None
