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
    now = datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds")
    head: dict[str, object] = {
        "ts": now,
        "level": "INFO",
        "logger": logger.name,
        "pid": os.getpid(),
    }
    out = []
    for message, fields in lines:
        entry = {**head, "message": message}
        entry.update((k, fields[k]) for k in FIELDS if fields.get(k) is not None)
        out.append(orjson.dumps(entry, default=str))
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
