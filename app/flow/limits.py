"""Limits on starting jobs: at most ``concurrency`` running at once, at most ``rate`` starts
per second, minute or hour (a token bucket holding up to ``burst`` starts).

A job type declares its limits in code (``@job_type(rate="10/s", concurrency=5)``); an
operator may override a type's, or set a queue's, over HTTP. :func:`in_force` decides which
apply. Nothing here talks to a store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PERIODS = {"s": 1, "m": 60, "h": 3600}
_RATE = re.compile(r"^\s*([1-9][0-9]{0,8})\s*/\s*([smh])\s*$")
UNITS = {v: k for k, v in PERIODS.items()}


def parse_rate(text: str) -> tuple[int, int]:
    """``"10/s"`` → (10, 1); ``"600/m"`` → (600, 60); ``"N/h"``. Raises ValueError."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"rate must look like N/s, N/m or N/h with N >= 1, not {text!r}")
    return int(match.group(1)), PERIODS[match.group(2)]


def format_rate(count: int, period: int) -> str:
    return f"{count}/{UNITS[period]}"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits on one job type or queue; ``None`` fields are not limited."""

    concurrency: int | None = None
    rate_count: int | None = None
    rate_period: int | None = None  # seconds: 1, 60 or 3600
    burst: int | None = None  # bucket size; None: the rate's count

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if (self.rate_count is None) != (self.rate_period is None):
            raise ValueError("a rate needs both a count and a period")
        if self.rate_count is not None and self.rate_count < 1:
            raise ValueError("rate must allow at least 1 start")
        if self.rate_period is not None and self.rate_period not in UNITS:
            raise ValueError("the rate's period must be 1, 60 or 3600 seconds")
        if self.burst is not None:
            if self.burst < 1:
                raise ValueError("burst must be at least 1")
            if self.rate_count is None:
                raise ValueError("burst needs a rate")

    @classmethod
    def declare(
        cls, *, concurrency: int | None = None, rate: str | None = None, burst: int | None = None
    ) -> Limits:
        count, period = parse_rate(rate) if rate is not None else (None, None)
        return cls(concurrency, count, period, burst)

    @property
    def any(self) -> bool:
        return self.concurrency is not None or self.rate_count is not None

    @property
    def rate(self) -> str | None:
        if self.rate_count is None or self.rate_period is None:
            return None
        return format_rate(self.rate_count, self.rate_period)

    @property
    def capacity(self) -> int:
        """The token bucket's size: starts allowed at once after an idle spell."""
        return self.burst if self.burst is not None else (self.rate_count or 1)

    @property
    def refill_per_second(self) -> float:
        if self.rate_count is None or self.rate_period is None:
            return 0.0
        return self.rate_count / self.rate_period


NO_LIMITS = Limits()


def in_force(declared: Limits | None, override: Limits | None) -> Limits:
    """An override set over HTTP replaces the declared limits whole (a null field in it lifts
    that limit); without one, the declaration holds."""
    if override is not None:
        return override
    return declared or NO_LIMITS
