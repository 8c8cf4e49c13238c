"""What a worker tells about the attempts it runs: one INFO log line per transition (job id,
type, queue, attempt, worker, duration; never a payload or a result), and the shared counters
and histograms (:data:`app.observe.tally.TALLY`, sent to Redis in one pipeline per flush, not
per job). Called once per claim batch, per report batch, per reclaim and per hand-back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from uuid import UUID

from app.jobs.attempts import Claim, Completion, Dead, Reclaimed
from app.logs import info_lines
from app.observe import families as f
from app.observe.tally import TALLY
from app.streams.client import Delivery
from workers.context import Attempt, Running

log = logging.getLogger("conveyor.jobs")

_begun: dict[Attempt, float] = {}  # monotonic start of each attempt this process runs


def _fields(job: Claim, worker: str, event: str, duration: float | None) -> dict[str, object]:
    return {
        "event": event,
        "job_id": str(job.id),
        "type": job.type,
        "queue": job.queue,
        "attempt": job.attempt,
        "worker": worker,
        "duration": None if duration is None else round(duration, 6),
    }


def _entry_age(delivery: Delivery, now: float) -> float | None:
    """Seconds since the entry was added (its id is the Redis time of the XADD, in ms)."""
    try:
        return max(0.0, now - int(delivery.entry_id.split("-", 1)[0]) / 1000)
    except ValueError:
        return None


def started(claimed: Sequence[Claim], deliveries: Mapping[UUID, Delivery], worker: str) -> None:
    """Attempts won by a claim: counted, their queue wait observed, their start noted."""
    wall, mono = time.time(), time.monotonic()
    info = log.isEnabledFor(logging.INFO)  # the line's fields are not built for nothing
    lines: list[tuple[str, dict[str, object]]] = []
    for job in claimed:
        labels = (job.queue, job.type)
        TALLY.count(f.STARTED, labels)
        delivery = deliveries.get(job.id)
        waited = None if delivery is None else _entry_age(delivery, wall)
        if waited is not None:
            TALLY.observe(f.QUEUE_WAIT, labels, waited)
        _begun[(job.id, job.token)] = mono
        if info:
            lines.append(("job started", _fields(job, worker, "started", waited)))
    if lines:
        info_lines(log, lines)


def reported(
    batch: Sequence[tuple[Completion, Running]],
    moved: Collection[UUID],
    dead: Sequence[Dead],
    ages: Mapping[UUID, float],
    worker: str,
) -> None:
    """Outcomes written (or fenced off) by one report statement."""
    now = time.monotonic()
    info = log.isEnabledFor(logging.INFO)
    went_dead = {d.id for d in dead}
    lines: list[tuple[str, dict[str, object]]] = []
    for completion, entry in batch:
        job = entry.job
        labels = (job.queue, job.type)
        begun = _begun.pop(entry.attempt, None)
        ran = None if begun is None else now - begun
        if ran is not None:
            TALLY.observe(f.RUN_TIME, labels, ran)
        event = _outcome(completion, job.id in moved, job.id in went_dead, labels)
        if job.id in ages:
            TALLY.observe(f.END_TO_END, labels, ages[job.id])
        if info:
            lines.append((f"job {event}", _fields(job, worker, event, ran)))
    if lines:
        info_lines(log, lines)


def _outcome(c: Completion, moved: bool, dead: bool, labels: tuple[str, str]) -> str:
    if not moved:
        TALLY.count(f.FAILED, (*labels, "fenced"))
        return "fenced"
    if c.unknown_type:
        TALLY.count(f.DEAD if dead else f.HANDED_BACK, labels)
        return "dead" if dead else "handed_back"
    if c.error is None:
        TALLY.count(f.SUCCEEDED, labels)
        return "succeeded"
    reason = "timeout" if c.error.get("type") == "Timeout" else "error"
    TALLY.count(f.FAILED, (*labels, reason))
    TALLY.count(f.DEAD if dead else f.RETRIED, labels)
    return "dead" if dead else "retrying"


def reclaimed(rows: Sequence[Reclaimed], worker: str) -> None:
    """Attempts of lost workers failed with ``worker lost`` (by this worker's sweep)."""
    for row in rows:
        labels = (row.queue, row.type)
        TALLY.count(f.RECLAIMED, labels)
        TALLY.count(f.FAILED, (*labels, "worker_lost"))
        TALLY.count(f.DEAD if row.status == "dead" else f.RETRIED, labels)
        log.info(
            "job reclaimed from a lost worker",
            extra={
                "event": "reclaimed",
                "job_id": str(row.id),
                "type": row.type,
                "queue": row.queue,
                "attempt": row.attempts,
                "worker": worker,
                "status": row.status,
            },
        )


def handed_back(jobs: Sequence[Claim], released: Collection[UUID], worker: str) -> None:
    """Attempts given back on shutdown (they do not count as attempts)."""
    now = time.monotonic()
    for job in jobs:
        begun = _begun.pop((job.id, job.token), None)
        if job.id not in released:
            continue
        TALLY.count(f.HANDED_BACK, (job.queue, job.type))
        ran = None if begun is None else now - begun
        log.info("job handed back", extra=_fields(job, worker, "handed_back", ran))
