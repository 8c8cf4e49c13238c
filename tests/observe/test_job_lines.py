"""app.logs.info_lines: a batch of per-job INFO lines, written at once under the process's own
JSON handler, and exactly what one ``logger.info`` each would have written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from app import logs

FIELDS: dict[str, object] = {
    "event": "started",
    "job_id": "0193c1e2-1234-7000-8000-123456789abc",
    "type": "demo.echo",
    "queue": "default",
    "attempt": 1,
    "worker": "w-1",
    "duration": None,  # left out, as by the formatter
    "payload": {"secret": 1},  # not a logged field: never written
}


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """The process's logging as ``conveyor worker`` sets it up, written to a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._installed
    logs.configure("INFO", "json")
    out = io.StringIO()
    assert logs._installed is not None
    logs._installed.setStream(out)
    try:
        yield out
    finally:
        root.handlers[:], level, logs._installed = saved
        root.setLevel(level)


@contextmanager
def alone() -> Iterator[None]:
    """Only configure()'s handler on the root, as in a Conveyor process (pytest adds its own
    capturing handlers around each test)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    assert logs._installed is not None
    root.handlers[:] = [logs._installed]
    try:
        yield
    finally:
        root.handlers[:] = saved


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _without_ts(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "ts"} for line in lines]


def test_the_lines_are_those_of_one_info_call_each(configured: io.StringIO) -> None:
    logger = logging.getLogger("conveyor.jobs")
    batch = [("job started", FIELDS), ("job succeeded", {**FIELDS, "event": "succeeded"})]
    with alone():
        for message, fields in batch:
            logger.info(message, extra=dict(fields))
        one_by_one = _lines(configured)
        configured.seek(0)
        configured.truncate()
        logs.info_lines(logger, batch)
    at_once = _lines(configured)
    assert _without_ts(at_once) == _without_ts(one_by_one)
    assert [line["message"] for line in at_once] == ["job started", "job succeeded"]
    assert at_once[0]["job_id"] == FIELDS["job_id"] and "payload" not in at_once[0]
    assert "duration" not in at_once[0] and at_once[0]["level"] == "INFO"
    assert configured.getvalue().endswith("\n") and configured.getvalue().count("\n") == 2


def test_written_in_one_go_without_log_records(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[object] = []
    real = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    with alone():
        logs.info_lines(logging.getLogger("conveyor.jobs"), [("job started", FIELDS)] * 500)
    assert made == []
    assert len(_lines(configured)) == 500


def test_below_info_nothing_is_written(configured: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    with alone():
        logs.info_lines(logging.getLogger("conveyor.jobs"), [("job started", FIELDS)])
    assert configured.getvalue() == ""


@pytest.mark.parametrize("setup", ["another handler", "a filter", "no propagation", "console"])
def test_any_other_set_up_gets_one_record_each(configured: io.StringIO, setup: str) -> None:
    logger = logging.getLogger("conveyor.jobs.test")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    with alone():
        _other_set_up(logger, setup, keep)
    expected = ["job started"] if setup == "a filter" else ["job started", "job dropped"]
    assert [r.getMessage() for r in seen] == expected
    assert all(getattr(r, "job_id", None) == FIELDS["job_id"] for r in seen)


def _other_set_up(logger: logging.Logger, setup: str, keep: logging.Handler) -> None:
    try:
        if setup == "another handler":
            logging.getLogger().addHandler(keep)
        elif setup == "a filter":
            logger.addHandler(keep)
            logger.addFilter(lambda record: record.getMessage() != "job dropped")
        elif setup == "no propagation":
            logger.addHandler(keep)
            logger.propagate = False
        else:
            assert logs._installed is not None
            logs._installed.setFormatter(logs.ConsoleFormatter())
            logging.getLogger().addHandler(keep)
        logs.info_lines(logger, [("job started", FIELDS), ("job dropped", FIELDS)])
    finally:
        logging.getLogger().removeHandler(keep)
        logger.handlers.clear()
        logger.filters.clear()
        logger.propagate = True


def test_caplog_sees_each_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logs.info_lines(logging.getLogger("conveyor.jobs"), [("job started", FIELDS)] * 3)
    assert [r.getMessage() for r in caplog.records] == ["job started"] * 3
