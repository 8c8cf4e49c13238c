"""Process-wide logging set-up for the CLI entry points."""

from __future__ import annotations

import logging


class _Extras(logging.Formatter):
    """Appends the ``extra={...}`` fields we log (job ids, statuses); never payloads."""

    FIELDS = ("job_id", "job_type", "status", "replayed")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={getattr(record, k)}" for k in self.FIELDS if hasattr(record, k)]
        return f"{line} {' '.join(extras)}" if extras else line


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Extras("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
