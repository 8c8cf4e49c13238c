"""Small line charts of the last hour, drawn as inline SVG by the templates: this module only
turns points into coordinates (numbers, never text from data)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 360
HEIGHT = 90
SPAN_SECONDS = 3600.0

Series = Sequence[tuple[float, float | None]]  # (seconds since the epoch, value or None)


@dataclass(frozen=True)
class Chart:
    first: list[tuple[float, float]]  # SVG coordinates of the first series' points
    second: list[tuple[float, float]]
    top: float  # the value at the top edge
    last_first: float | None  # the newest value of each series
    last_second: float | None
    unit: str
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def empty(self) -> bool:
        return not self.first and not self.second


def _nice(value: float) -> float:
    """The smallest of 1, 2, 5 times 10^n at or above ``value``."""
    if value <= 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(value))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= value)


def _points(series: Series, now: float, top: float) -> list[tuple[float, float]]:
    out = []
    for at, value in series:
        if value is None or at < now - SPAN_SECONDS:
            continue
        x = WIDTH * (1 - (now - at) / SPAN_SECONDS)
        y = HEIGHT * (1 - value / top)
        out.append((round(x, 1), round(y, 1)))
    return out


def _last(series: Series) -> float | None:
    values = [v for _, v in series if v is not None]
    return values[-1] if values else None


def chart(first: Series, second: Series, unit: str, now: float | None = None) -> Chart:
    now = time.time() if now is None else now
    values = [v for _, v in (*first, *second) if v is not None]
    top = _nice(max(values, default=0.0))
    return Chart(
        first=_points(first, now, top),
        second=_points(second, now, top),
        top=top,
        last_first=_last(first),
        last_second=_last(second),
        unit=unit,
    )
