"""The job status machine.

::

    scheduled ──(run_at due)──► queued ──claim──► running ──► succeeded
        │                         ▲   ▲              │
        │                         │   │              ├─ fails, attempts left ──► retrying
        │                         │   └──────────────┤       (next_attempt_at due) ─┘ → queued
        │                         │                  └─ fails, none left / permanent ──► dead
        └──────── cancel ─────────┴── cancel (queued, scheduled, retrying) ──► cancelled
                                     dead ──replay──► queued
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    SCHEDULED = "scheduled"  # waits for run_at
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # waits for next_attempt_at
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED}
)
WAITING: frozenset[JobStatus] = frozenset(
    {JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.RETRYING}
)
CANCELLABLE = WAITING


class JobEvent(StrEnum):
    """What ``job_events.event`` records for each transition."""

    SUBMITTED = "submitted"
    SCHEDULED = "scheduled"
    PROMOTED = "promoted"
    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # an attempt failed; the job waits to retry
    DEAD = "dead"
    RECLAIMED = "reclaimed"  # the holder was lost; the attempt counts as failed
    RELEASED = "released"  # handed back on shutdown; the attempt does not count
    CANCELLED = "cancelled"
    REPLAYED = "replayed"
    DLQ_REMOVED = "dlq_removed"
