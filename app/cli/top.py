"""``conveyor top``: live queue counts and rates in the terminal.

Each frame reads ``GET /v1/queues`` (counts, paused), ``GET /v1/workers`` (live workers) and
``GET /metrics`` (the job counters, summed per queue over types); rates are the counters'
increase between two frames over the time between them. The API serves all three from its
cached snapshot and the shared counters, so any number of ``top`` windows costs it little.
``--once`` takes two samples ``--interval`` apart and prints one frame.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.live import Live
from rich.table import Table

from app.cli.output import QUEUE_COUNTS, emit, stdout, wants_table

# rate column -> the counter sample it is the rate of
RATES = {
    "in/s": "conveyor_jobs_submitted_total",
    "done/s": "conveyor_jobs_succeeded_total",
    "failed/s": "conveyor_job_attempts_failed_total",
    "dead/s": "conveyor_jobs_dead_total",
}


@dataclass
class Sample:
    at: float
    queues: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    totals: dict[str, dict[str, float]] = field(default_factory=dict)  # queue -> sample -> sum


def sample(client: httpx.Client) -> Sample:
    queues = client.get("/v1/queues")
    queues.raise_for_status()
    workers = client.get("/v1/workers")
    workers.raise_for_status()
    metrics = client.get("/metrics")
    metrics.raise_for_status()
    return Sample(
        time.monotonic(), queues.json()["items"], workers.json()["items"], _totals(metrics.text)
    )


def _totals(text: str) -> dict[str, dict[str, float]]:
    wanted = set(RATES.values())
    totals: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(wanted, 0.0))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and "queue" in s.labels:
                totals[s.labels["queue"]][s.name] += s.value
    return dict(totals)


def frame(before: Sample | None, now: Sample) -> dict[str, Any]:
    """One frame as data: per queue its counts, counter totals and rates (None on the first)."""
    elapsed = now.at - before.at if before is not None else 0.0
    rows = []
    for q in now.queues:
        name = q["queue"]
        totals = now.totals.get(name, {})
        row: dict[str, Any] = {"queue": name, "paused": bool(q.get("paused"))}
        row.update({c: q.get(c, 0) for c in QUEUE_COUNTS})
        for column, metric in RATES.items():
            row[metric.removeprefix("conveyor_")] = totals.get(metric, 0.0)
            if before is None or elapsed <= 0:
                row[column] = None
            else:
                earlier = before.totals.get(name, {}).get(metric, 0.0)
                row[column] = max(0.0, totals.get(metric, 0.0) - earlier) / elapsed
        rows.append(row)
    return {
        "at": datetime.now(UTC).isoformat(),
        "interval": round(elapsed, 3),
        "workers": len(now.workers),
        "in_flight": sum(w.get("in_flight", 0) for w in now.workers),
        "capacity": sum(w.get("concurrency", 0) for w in now.workers),
        "queues": rows,
    }


def render(data: dict[str, Any], url: str) -> Table:
    title = (
        f"conveyor top  {url}  {data['workers']} worker(s), "
        f"{data['in_flight']}/{data['capacity']} busy  {data['at'][11:19]} UTC"
    )
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("queue", no_wrap=True)
    table.add_column("paused", no_wrap=True)
    for name in (*QUEUE_COUNTS, *RATES):
        table.add_column(name, justify="right", no_wrap=True)
    for row in data["queues"]:
        counts = [str(row[c]) for c in QUEUE_COUNTS]
        rates = ["-" if row[c] is None else f"{row[c]:.1f}" for c in RATES]
        table.add_row(row["queue"], "paused" if row["paused"] else "", *counts, *rates)
    return table


def run_top(client: httpx.Client, args: argparse.Namespace) -> int:
    try:
        return _run(client, args)
    except httpx.HTTPStatusError as exc:
        response = exc.response
        print(f"top: {response.request.url.path} answered {response.status_code}", file=sys.stderr)
    except httpx.TransportError as exc:
        print(f"top: {exc!r}", file=sys.stderr)
    return 1


def _run(client: httpx.Client, args: argparse.Namespace) -> int:
    url = str(client.base_url)
    if args.once:
        first = sample(client)
        if args.interval > 0:
            time.sleep(args.interval)
        data = frame(first, sample(client))
        emit(data, args, lambda d: render(d, url))
        return 0
    if not wants_table(args):  # a stream of JSON frames, one per line
        return _json_frames(client, args)
    previous: Sample | None = None
    try:
        with Live(console=stdout(), auto_refresh=False, screen=False) as live:
            while True:
                now = sample(client)
                live.update(render(frame(previous, now), url), refresh=True)
                previous = now
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _json_frames(client: httpx.Client, args: argparse.Namespace) -> int:
    previous: Sample | None = None
    try:
        while True:
            now = sample(client)
            print(json.dumps(frame(previous, now)), flush=True)
            previous = now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
