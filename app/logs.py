"""Process-wide logging set-up for the CLI entry points.

``CONVEYOR_LOG_FORMAT=json`` (the default of ``conveyor api`` and ``conveyor worker``): one
JSON object per line with ``ts``, ``level``, ``logger``, ``message`` and the fields logged
with ``extra={...}`` (job id, type, queue, attempt, worker, duration, ...). ``console``
(``conveyor dev``): readable ``key=value`` lines. Only the fields named in :data:`FIELDS` are
ever written, so nothing passed by accident (a payload, a result) reaches the logs.

The hot paths log one line per job (each transition, each submission). :func:`info_lines`
writes a batch of them in one go when :func:`configure`'s JSON handler alone would write
them: the same lines, without a ``LogRecord``, a caller lookup and a flush each, which had
made a worker at ``INFO`` spend 2.5 times the CPU per job it spends at ``WARNING``. Any
other set-up (another handler, a filter, pytest's ``caplog``) gets one ``logger.info`` each.
"""

from __future__ import annotations

import logging
import os
import time
import typing
from collections.abc import Iterable, Mapping
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


def _extras(values: Mapping[str, object]) -> dict[str, object]:
    """The logged fields among a record's attributes (or a line's fields), in FIELDS order."""
    return {k: values[k] for k in FIELDS if values.get(k) is not None}


def _ts(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def _entry(
    ts: str, level: str, logger: str, pid: int | None, message: str, fields: Mapping[str, object]
) -> dict[str, object]:
    """One JSON line's object: the fixed keys, then the logged fields."""
    entry: dict[str, object] = {
        "ts": ts,
        "level": level,
        "logger": logger,
        "pid": pid,
        "message": message,
    }
    entry.update(_extras(fields))
    return entry


class ConsoleFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record.__dict__).items())
        return f"{line} {extras}" if extras else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(
            _ts(record.created),
            record.levelname,
            record.name,
            record.process,
            record.getMessage(),
            record.__dict__,
        )
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else ConsoleFormatter()


_installed: logging.StreamHandler[typing.TextIO] | None = None  # the handler configure() set


def configure(level: str = "INFO", fmt: str = "console") -> None:
    global _installed
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _installed = handler


def _direct(logger: logging.Logger) -> logging.StreamHandler[typing.TextIO] | None:
    """:func:`configure`'s JSON handler, when it alone would write ``logger``'s INFO records:
    no other handler and no filter on the way to the root, nothing disabled."""
    handler = _installed
    if (
        handler is None
        or type(handler.formatter) is not JsonFormatter
        or handler.filters
        or handler.level > logging.INFO
        or logging.root.manager.disable >= logging.INFO
    ):
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or node.disabled:
            return None
        if node is logging.root:
            return handler if node.handlers == [handler] else None
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    return None


def info_lines(logger: logging.Logger, lines: Iterable[tuple[str, Mapping[str, object]]]) -> None:
    """INFO lines of ``logger``, each ``(message, fields)``: what ``logger.info(message,
    extra=fields)`` writes for each, written at once when it can be (see above)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _direct(logger)
    if handler is None:
        for message, fields in lines:
            logger.info(message, extra=dict(fields))
        return
    ts, name, pid = _ts(time.time()), logger.name, os.getpid()
    out = [
        orjson.dumps(_entry(ts, "INFO", name, pid, message, fields), default=str)
        for message, fields in lines
    ]
    if not out:
        return
    text = b"\n".join(out).decode() + handler.terminator
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.flush()
    except Exception:  # as logging does: never into the caller
        handler.handleError(logging.makeLogRecord({"msg": "job lines", "levelno": logging.INFO}))
    finally:
        handler.release()
