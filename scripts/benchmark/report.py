"""The result: a table of medians with Conveyor's ratio to each other system, JSON and a plot."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.stats import Figure, ratio

CONVEYOR = "conveyor"


@dataclass
class Results:
    settings: dict[str, object]
    figures: dict[tuple[str, str], Figure] = field(default_factory=dict)
    # system -> offered rate -> one (p50, p99) per repetition, in ms
    curves: dict[str, dict[float, list[tuple[float, float]]]] = field(default_factory=dict)

    def figure(self, system: str, metric: str, unit: str, higher: bool = True) -> Figure:
        key = (system, metric)
        if key not in self.figures:
            self.figures[key] = Figure(system, metric, unit, higher_is_better=higher)
        return self.figures[key]

    def add(
        self, system: str, metric: str, unit: str, value: float | None, higher: bool = True
    ) -> None:
        self.figure(system, metric, unit, higher).add(value)

    def point(self, system: str, rate: float, p50: float, p99: float) -> None:
        self.curves.setdefault(system, {}).setdefault(rate, []).append((p50, p99))

    def metrics(self) -> list[str]:
        seen: dict[str, None] = {}
        for _, metric in self.figures:
            seen.setdefault(metric)
        return list(seen)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(metric, Conveyor, other system, its value, Conveyor ÷ other) per pair."""
        out = []
        for metric in self.metrics():
            ours = self.figures.get((CONVEYOR, metric))
            others = [f for (s, m), f in self.figures.items() if m == metric and s != CONVEYOR]
            label = f"{metric} ({ours.unit if ours else others[0].unit}" + (
                ", higher is better)"
                if (ours or others[0]).higher_is_better
                else ", lower is better)"
            )
            mine = ours.text() if ours else "-"
            if not others:
                out.append((label, mine, "", "", ""))
            for f in others:
                r = ratio(ours, f) if ours else math.nan
                out.append((label, mine, f.system, f.text(), "" if math.isnan(r) else f"{r:.2f}"))
                label, mine = "", ""
        return out

    def table(self) -> str:
        head = "| figure | Conveyor | other | other's figure | Conveyor ÷ other |\n"
        head += "| --- | --- | --- | --- | --- |\n"
        return head + "".join(f"| {' | '.join(r)} |\n" for r in self.rows())

    def to_json(self) -> dict[str, object]:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) or math.isinf(x) else x

        return {
            "settings": self.settings,
            "machine": {"python": platform.python_version(), "cpus": _cpus()},
            "figures": [f.as_dict() for f in self.figures.values()],
            "ratios": [
                {"metric": m, "other": s, "conveyor_over_other": clean(ratio(f0, f))}
                for (s, m), f in self.figures.items()
                if s != CONVEYOR and (f0 := self.figures.get((CONVEYOR, m)))
            ],
            "latency_curves": {
                system: {
                    str(rate): [{"p50_ms": clean(a), "p99_ms": clean(b)} for a, b in points]
                    for rate, points in sorted(per_rate.items())
                }
                for system, per_rate in self.curves.items()
            },
        }

    def write(self, directory: Path, stem: str) -> tuple[Path, Path | None]:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path, self.plot(directory / f"{stem}.png")

    def plot(self, path: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
        ceiling = 10_000.0
        for system, per_rate in sorted(self.curves.items()):
            rates = sorted(per_rate)
            p99 = [_median([min(b, ceiling) for _, b in per_rate[r]]) for r in rates]
            p50 = [_median([min(a, ceiling) for a, _ in per_rate[r]]) for r in rates]
            (line,) = left.plot(rates, p99, marker="o", label=f"{system} p99")
            left.plot(
                rates,
                p50,
                marker=".",
                linestyle="--",
                color=line.get_color(),
                label=f"{system} p50",
            )
        left.axhline(100, color="grey", linewidth=0.8, linestyle=":")
        left.set(
            xscale="log",
            yscale="log",
            xlabel="offered jobs/s (open loop)",
            ylabel="submit→start ms",
        )
        left.set_title(f"latency vs offered load (≥{ceiling:,.0f} ms: saturated)")
        left.legend(fontsize=7)
        bars = [
            m
            for m in self.metrics()
            if m.startswith(("drain", "batch submit")) or m.endswith("req/s")
        ]
        systems = sorted(
            {s for (s, m) in self.figures if m in bars}, key=lambda s: (s != CONVEYOR, s)
        )
        width = 0.8 / max(1, len(systems))
        for i, system in enumerate(systems):
            values = [
                self.figures[(system, m)].median if (system, m) in self.figures else 0 for m in bars
            ]
            left_edges = [j + i * width for j in range(len(bars))]
            right.bar(left_edges, [0 if math.isnan(v) else v for v in values], width, label=system)
        right.set_xticks([j + 0.4 - width / 2 for j in range(len(bars))])
        right.set_xticklabels([m.replace(" ", "\n", 2) for m in bars], fontsize=7)
        right.set_yscale("log")
        right.set_ylabel("per second (median)")
        right.set_title("throughput per system")
        right.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
