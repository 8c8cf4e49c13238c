"""Figures over repetitions: each is a list of samples shown as median [min-max].

A sample may be NaN (not measured) or infinite (a latency where the system did not keep up:
some jobs never started in time); infinite samples count in the median and the range.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Figure:
    """One measured quantity of one system, one sample per repetition."""

    system: str
    metric: str
    unit: str
    samples: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    note: str = ""

    def add(self, value: float | None) -> None:
        self.samples.append(math.nan if value is None else float(value))

    @property
    def valid(self) -> list[float]:
        return [s for s in self.samples if not math.isnan(s)]

    @property
    def median(self) -> float:
        return statistics.median(self.valid) if self.valid else math.nan

    @property
    def low(self) -> float:
        return min(self.valid) if self.valid else math.nan

    @property
    def high(self) -> float:
        return max(self.valid) if self.valid else math.nan

    def text(self) -> str:
        if not self.valid:
            return "n/a"
        if math.isinf(self.median):
            kept = [s for s in self.valid if not math.isinf(s)]
            some = f" (kept up in {len(kept)}: {', '.join(_num(s) for s in kept)})" if kept else ""
            return f"did not keep up{some}"
        missing = len(self.samples) - len(self.valid)
        spread = "" if len(self.valid) < 2 else f" [{_num(self.low)}-{_num(self.high)}]"
        gaps = f" ({missing} of {len(self.samples)} n/a)" if missing else ""
        return f"{_num(self.median)}{spread}{gaps}"

    def as_dict(self) -> dict[str, object]:
        return {
            "system": self.system,
            "metric": self.metric,
            "unit": self.unit,
            "samples": [_json(s) for s in self.samples],
            "median": _json(self.median),
            "min": _json(self.low),
            "max": _json(self.high),
            "higher_is_better": self.higher_is_better,
            "note": self.note,
        }


def ratio(ours: Figure, theirs: Figure) -> float:
    """Conveyor's median over the other's (read with the metric's direction)."""
    a, b = ours.median, theirs.median
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b) or b == 0:
        return math.nan
    return a / b


def _json(x: float) -> float | str | None:
    """NaN is null (not measured); infinity is the string "did not keep up"."""
    if math.isnan(x):
        return None
    return "did not keep up" if math.isinf(x) else x


def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"
