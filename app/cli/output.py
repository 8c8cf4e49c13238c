"""How the operator commands print: tables for a person, JSON for a script.

``--output table`` or ``--output json``; the default (``auto``) is a table when standard
output is a terminal and JSON otherwise, so pipes and scripts keep getting the API's JSON
unchanged. Progress bars go to standard error, and only when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

Render = Callable[[Any], Table]
MAX_CELL = 60  # characters of an error or result shown in a cell
WIDE = 1000  # columns of a table that does not go to a terminal


def add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        "-o",
        choices=["auto", "table", "json"],
        default="auto",
        help="table or json (default: a table on a terminal, JSON otherwise)",
    )


def wants_table(args: argparse.Namespace) -> bool:
    mode = getattr(args, "output", "auto")
    return mode == "table" or (mode == "auto" and sys.stdout.isatty())


def stdout() -> Console:
    """Standard output; a table written to a pipe or a file keeps its natural width (a
    terminal's width bounds it)."""
    width = None if sys.stdout.isatty() else WIDE
    return Console(highlight=False, soft_wrap=False, width=width)


def show(response: httpx.Response, args: argparse.Namespace, render: Render | None = None) -> int:
    """The answer: a table (``render``) of a 2xx body when tables are wanted, else its JSON;
    exit status 0 for a 2xx, else 1."""
    if response.status_code == 204:
        return 0
    try:
        body = response.json()
    except ValueError:
        print(response.text)
        return 0 if response.is_success else 1
    if not response.is_success:
        if wants_table(args) and isinstance(body, dict) and "message" in body:
            print(f"{response.status_code} {body.get('error')}: {body['message']}", file=sys.stderr)
        else:
            print(json.dumps(body, indent=2))
        return 1
    emit(body, args, render)
    return 0


def emit(body: Any, args: argparse.Namespace, render: Render | None) -> None:
    if render is not None and wants_table(args):
        stdout().print(render(body))
    else:
        print(json.dumps(body, indent=2))


@contextmanager
def progress(args: argparse.Namespace) -> Iterator[Progress]:
    """A progress bar on standard error; drawn only when it is a terminal."""
    err = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    )
    with bar:
        yield bar


# -- tables -----------------------------------------------------------------------------------


def _cell(value: Any, limit: int = MAX_CELL) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def age(value: str | None, now: datetime | None = None) -> str:
    """``2026-11-28T15:00:00Z`` as how long ago: ``4s``, ``3m10s``, ``2h05m``, ``3d04h``."""
    if not value:
        return "-"
    then = datetime.fromisoformat(value.replace("Z", "+00:00"))
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    return duration(seconds)


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(title: str | None, columns: Sequence[str], numeric: Sequence[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in columns:
        table.add_column(name, justify="right" if name in numeric else "left", no_wrap=True)
    return table


QUEUE_COUNTS = ("waiting", "scheduled", "retrying", "running", "dead", "pending")


def queues_table(body: Mapping[str, Any]) -> Table:
    table = _table(None, ("queue", "paused", *QUEUE_COUNTS), QUEUE_COUNTS)
    for q in body.get("items", []):
        paused = "paused" if q.get("paused") else ""
        table.add_row(q["queue"], paused, *(str(q.get(c, 0)) for c in QUEUE_COUNTS))
    return table


def workers_table(body: Mapping[str, Any]) -> Table:
    columns = ("name", "queues", "in flight", "concurrency", "host", "pid", "up", "last seen")
    table = _table(None, columns, ("in flight", "concurrency", "pid"))
    for w in body.get("items", []):
        table.add_row(
            w["name"],
            ",".join(w.get("queues", [])),
            str(w.get("in_flight", 0)),
            str(w.get("concurrency", 0)),
            _cell(w.get("host")),
            _cell(w.get("pid")),
            age(w.get("started_at")),
            age(w.get("last_seen_at")) + " ago",
        )
    return table


def _last_error(job: Mapping[str, Any]) -> str:
    errors = job.get("errors") or []
    return _cell(errors[-1].get("error")) if errors else "-"


def jobs_table(body: Mapping[str, Any]) -> Table:
    columns = ("id", "type", "queue", "status", "attempts", "finished", "last error")
    table = _table(None, columns, ("attempts",))
    for j in body.get("items", []):
        table.add_row(
            j["id"],
            j["type"],
            j["queue"],
            j["status"],
            f"{j['attempts']}/{j['max_attempts']}",
            age(j.get("finished_at")) + " ago" if j.get("finished_at") else "-",
            _last_error(j),
        )
    if body.get("next_cursor"):
        table.caption = "more: --cursor " + body["next_cursor"]
    elif not body.get("items"):
        table.caption = "none"
    return table


JOB_FIELDS = ("id", "type", "queue", "status", "priority", "attempts", "created_at")
JOB_TIMES = ("run_at", "started_at", "finished_at", "next_attempt_at")


def _record_table() -> Table:
    """Two columns without a header: a field's name in bold, then its value."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    return table


def job_table(job: Mapping[str, Any]) -> Table:
    table = _record_table()
    for name in JOB_FIELDS:
        value = job.get(name)
        if name == "attempts":
            value = f"{job['attempts']}/{job['max_attempts']}"
        table.add_row(name, _cell(value))
    for name in JOB_TIMES:
        if job.get(name):
            table.add_row(name, job[name])
    if job.get("progress"):
        table.add_row("progress", _cell(job["progress"]))
    table.add_row("result", _cell(job.get("result")))
    for error in job.get("errors") or []:
        table.add_row(f"error #{error['attempt']}", _cell(error.get("error")))
    return table


def schedules_table(body: Mapping[str, Any]) -> Table:
    table = _table(None, ("name", "cron", "type", "queue", "enabled", "next run"))
    for s in body.get("items", []):
        table.add_row(
            s["name"],
            f"{s['cron']} ({s['timezone']})" if s.get("timezone", "UTC") != "UTC" else s["cron"],
            s["type"],
            s["queue"],
            "yes" if s.get("enabled") else "paused",
            _cell(s.get("next_run_at")),
        )
    if not body.get("items"):
        table.caption = "none"
    return table


SCHEDULE_FIELDS = ("name", "cron", "timezone", "type", "queue", "priority", "enabled", "missed")
SCHEDULE_TIMES = ("next_run_at", "last_run_at", "created_at", "updated_at")


def schedule_table(schedule: Mapping[str, Any]) -> Table:
    table = _record_table()
    for name in SCHEDULE_FIELDS:
        table.add_row(name, _cell(schedule.get(name)))
    table.add_row("payload", _cell(schedule.get("payload")))
    table.add_row("source", _cell(schedule.get("source")))
    for name in SCHEDULE_TIMES:
        table.add_row(name, _cell(schedule.get(name)))
    return table


def summary_table(title: str, counts: Mapping[str, int]) -> Table:
    table = _table(title, ("", "jobs"), ("jobs",))
    for name, n in counts.items():
        table.add_row(name, str(n))
    return table
