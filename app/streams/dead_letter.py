"""The entries of the ``<prefix>:dlq`` notification stream, bounded by size.

The dead-letter queue of record is the ``dead`` status in Postgres, with each job's whole
error history; the stream entry only announces the death, with the newest errors that fit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

DLQ_MAXLEN = 10_000  # entries kept in P:dlq (at most CONVEYOR_STREAM_MAXLEN)
DLQ_ENTRY_MAX_BYTES = 2048  # one P:dlq entry: ids, and the newest errors that fit
_DLQ_TRACEBACK_CHARS = 800


def dead_letter_entry(
    job_id: str, type: str, queue: str, attempts: int, errors: Sequence[Any]
) -> dict[str, str]:
    """The ``P:dlq`` entry of a dead job, at most :data:`DLQ_ENTRY_MAX_BYTES` bytes.

    ``errors`` keeps the newest errors that fit, oldest first, each with its attempt, error
    (cut to 300 characters), type and time; only the last keeps a traceback (its last 800
    characters). ``errors_omitted`` counts the older ones left out: the full history is the
    job's ``errors`` in Postgres (``GET /v1/jobs/{id}``).
    """
    head = {"job": job_id[:64], "type": type[:128], "queue": queue[:64], "attempts": str(attempts)}
    room = DLQ_ENTRY_MAX_BYTES - _size(head) - len("errors[]errors_omitted") - 8
    kept: list[str] = []
    for n, error in enumerate(reversed(errors)):
        encoded = _fit(error, room, newest=n == 0)
        if encoded is None:
            break
        kept.append(encoded)
        room -= len(encoded.encode()) + 1
    return {
        **head,
        "errors": "[" + ",".join(reversed(kept)) + "]",
        "errors_omitted": str(len(errors) - len(kept)),
    }


def bounded_dead_letter(fields: dict[str, str]) -> dict[str, str]:
    """``fields`` cut to the size of a :func:`dead_letter_entry` (whole histories included)."""
    try:
        errors = json.loads(fields.get("errors", "[]"))
    except ValueError:
        errors = []
    entry = dead_letter_entry(
        fields.get("job", ""),
        fields.get("type", ""),
        fields.get("queue", ""),
        int(fields["attempts"]) if fields.get("attempts", "").isdigit() else 0,
        errors if isinstance(errors, list) else [],
    )
    if "errors_omitted" in fields and fields["errors_omitted"].isdigit():
        omitted = int(fields["errors_omitted"]) + int(entry["errors_omitted"])
        entry["errors_omitted"] = str(omitted)
    return entry


def _fit(error: Any, room: int, *, newest: bool) -> str | None:
    """One error as JSON in fewer than ``room`` bytes, or None. Only the newest keeps (the
    end of) its traceback, cut shorter if it does not fit."""
    limits = ((_DLQ_TRACEBACK_CHARS, 300), (200, 300), (0, 300), (0, 60)) if newest else ((0, 300),)
    for traceback_chars, error_chars in limits:
        brief = _brief_error(error, traceback_chars, error_chars)
        encoded = json.dumps(brief, default=str, ensure_ascii=False)
        if len(encoded.encode()) < room:
            return encoded
    return None


def _brief_error(error: Any, traceback_chars: int, error_chars: int) -> dict[str, Any]:
    if not isinstance(error, dict):
        return {"error": str(error)[:error_chars]}
    brief = {k: error[k] for k in ("attempt", "type", "at") if k in error}
    if isinstance(brief.get("type"), str):
        brief["type"] = brief["type"][:128]
    if "error" in error:
        brief["error"] = str(error["error"])[:error_chars]
    if traceback_chars and error.get("traceback"):
        brief["traceback"] = str(error["traceback"])[-traceback_chars:]
    return brief


def _size(fields: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in fields.items())
