"""Request and response bodies of the flow controls: pause, limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.flow.limits import Limits, parse_rate

Source = Literal["code", "api", "none"]


class LimitsUpdate(BaseModel):
    """The limits to enforce from now on; a null (or absent) field lifts that limit."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = Field(
        default=None, ge=1, le=1_000_000, description="At most this many running at once."
    )
    rate: str | None = Field(
        default=None,
        max_length=20,
        description='At most N starts per second, minute or hour: "N/s", "N/m" or "N/h".',
        examples=["10/s"],
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Starts allowed at once after an idle spell (the token bucket's size);"
        " default: the rate's N. Needs a rate.",
    )

    @model_validator(mode="after")
    def _check(self) -> LimitsUpdate:
        self.to_limits()  # a ValueError here is a 422
        return self

    def to_limits(self) -> Limits:
        count, period = parse_rate(self.rate) if self.rate is not None else (None, None)
        return Limits(self.concurrency, count, period, self.burst)


class LimitsOut(BaseModel):
    """The limits in force, and where they come from: declared in ``code``, set over HTTP
    (``api``), or ``none``."""

    concurrency: int | None
    rate: str | None
    burst: int | None = Field(description="The bucket size in force when a rate is set.")
    source: Source

    @classmethod
    def of(cls, limits: Limits, source: Source) -> LimitsOut:
        burst = limits.capacity if limits.rate_count is not None else None
        return cls(concurrency=limits.concurrency, rate=limits.rate, burst=burst, source=source)


class QueueLimits(LimitsOut):
    queue: str


class TypeLimits(LimitsOut):
    type: str


class QueuePaused(BaseModel):
    queue: str
    paused: bool
