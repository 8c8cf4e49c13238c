"""The job status machine.

::

    scheduled ──(run_at due)──► queued ──claim──► running ──► succeeded
        │                         ▲   ▲              │
        │                         │   │              ├─ fails, attempts left ──► retrying
        │                         │   └──────────────┤       (next_attempt_at due) ─┘ → queued
        │                         │                  └─ fails, none left / permanent ──► dead
        └──────── cancel ─────────┴── cancel (queued, scheduled, retrying) ──► cancelled
                                     dead ──replay──► queued
    running ──cancel requested (the worker stops it; or reclaim/release)──► cancelled
    running ──RetryLater (attempt given back)──► retrying
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


# Statuses that end a job: ``finished_at`` is set exactly in these (a CHECK constraint).
TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED}
)
WAITING: frozenset[JobStatus] = frozenset(
    {JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.RETRYING}
)
CANCELLABLE = WAITING
