"""Process-wide logging set-up for the CLI entry points.

``CONVEYOR_LOG_FORMAT=json`` (the default of ``conveyor api`` and ``conveyor worker``): one
JSON object per line with ``ts``, ``level``, ``logger``, ``message`` and the fields logged
with ``extra={...}`` (job id, type, queue, attempt, worker, duration, ...). ``console``
(``conveyor dev``): readable ``key=value`` lines. Only the fields named in :data:`FIELDS` are
ever written, so nothing passed by accident (a payload, a result) reaches the logs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

FIELDS = (
    "event",
    "job_id",
    "type",
    "job_type",
    "queue",
    "attempt",
    "worker",
    "duration",
    "status",
    "replayed",
    "alert",
    "value",
    "threshold",
)


def _extras(record: logging.LogRecord) -> dict[str, object]:
    values = record.__dict__
    return {k: values[k] for k in FIELDS if values.get(k) is not None}


class ConsoleFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{line} {extras}" if extras else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else ConsoleFormatter()


def configure(level: str = "INFO", fmt: str = "console") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
