"""Retention: finished jobs are deleted some time after they finished (ADR 0017).

How long is decided per terminal status (``CONVEYOR_RETENTION_SUCCEEDED_SECONDS``,
``..._CANCELLED_SECONDS``, ``..._DEAD_SECONDS``; 0 keeps forever) and may be overridden per
job type (``@job_type(..., retention={"succeeded": 3600})``). The policy is read when a job is
shown (``result_expires_at``) and when the workers prune, never stored in the row: a changed
setting applies to every finished job at once. A job goes with its events (deleted in the
same statement: ``job_events`` has no foreign key to cascade, ADR 0027) and with its
idempotency key (a column of the row), so a key can be used again once its job is gone.

Pruning (:func:`prune_pass`) walks ``ix_jobs_finished`` (status, type, finished_at, over the
finished rows only): the distinct types of a status by a skip scan, then for each (status,
type) the oldest rows past their retention, in batches of their own short transactions, rows
locked with ``SKIP LOCKED``. Its cost per batch is a few index probes, whatever the table
holds; it never touches an unfinished row, so submissions and claims never wait for it. Only
one worker prunes at a time (a transaction-level advisory lock per batch).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from app.jobs.status import TERMINAL, JobStatus
from app.settings import Settings

if TYPE_CHECKING:
    from app.jobs.registry import Registry

# pg_try_advisory_xact_lock key of the pruning duty ("conveyor retention").
PRUNE_LOCK = 0x636F6E76_72657400 & 0x7FFFFFFFFFFFFFFF
PRUNE_BATCH = 1000


@dataclass(frozen=True)
class Policy:
    """Seconds each finished job is kept: per status, overridden per type (0: forever)."""

    default: Mapping[JobStatus, float]
    by_type: Mapping[str, Mapping[JobStatus, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings, registry: Registry | None = None) -> Policy:
        default = {
            JobStatus.SUCCEEDED: settings.retention_succeeded_seconds,
            JobStatus.CANCELLED: settings.retention_cancelled_seconds,
            JobStatus.DEAD: settings.retention_dead_seconds,
        }
        types = registry.all() if registry is not None else []
        return cls(default, {t.name: t.retention for t in types if t.retention})

    def seconds(self, status: JobStatus, type_: str) -> float:
        """How long a finished job is kept (0: forever); 0 for a status that is not final."""
        if status not in TERMINAL:
            return 0.0
        override = self.by_type.get(type_, {})
        return override.get(status, self.default.get(status, 0.0))

    def expires_at(
        self, status: JobStatus, type_: str, finished_at: datetime | None
    ) -> datetime | None:
        """When the job (and its result) will be deleted: None while it is not finished, or
        when it is kept forever. Pruning deletes it at that time or soon after."""
        seconds = self.seconds(status, type_)
        if finished_at is None or seconds <= 0:
            return None
        try:
            return finished_at + timedelta(seconds=seconds)
        except OverflowError:
            return None


# The types that have finished jobs of one status: a skip scan of ix_jobs_finished, one index
# probe per type (a loose index scan), however many rows each has. "ORDER BY type,
# finished_at" is an order only that index gives: with "ORDER BY type" alone, the planner
# took ix_jobs_type_created on a large table and filtered its way to the status.
_TYPES = """
WITH RECURSIVE t(type) AS (
    (SELECT type FROM jobs WHERE status = $1 AND finished_at IS NOT NULL
     ORDER BY type, finished_at LIMIT 1)
    UNION ALL
    SELECT (SELECT j.type FROM jobs j WHERE j.status = $1 AND j.finished_at IS NOT NULL
            AND j.type > t.type ORDER BY j.type, j.finished_at LIMIT 1)
    FROM t WHERE t.type IS NOT NULL
)
SELECT type FROM t WHERE type IS NOT NULL
"""

# The oldest expired rows of one (status, type), straight from ix_jobs_finished. A job whose
# completion callback is still being delivered waits for it. Its events go in the same
# statement, found by ix_job_events_job: no event can be added meanwhile, since every event is
# written by a statement that changes its job's row, which this one holds locked.
_DELETE = """
WITH gone AS (
    DELETE FROM jobs WHERE id = ANY(ARRAY(
        SELECT id FROM jobs
        WHERE status = $1 AND type = $2 AND finished_at IS NOT NULL
          AND finished_at < statement_timestamp() - make_interval(secs => $3)
          AND callback_status IS DISTINCT FROM 'pending'
        ORDER BY finished_at LIMIT $4
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id
), events AS (
    DELETE FROM job_events WHERE job_id = ANY(ARRAY(SELECT id FROM gone))
)
SELECT count(*) FROM gone
"""


async def finished_types(conn: asyncpg.Connection, status: JobStatus) -> list[str]:
    return [r[0] for r in await conn.fetch(_TYPES, status.value)]


async def prune_batch(
    conn: asyncpg.Connection, status: JobStatus, type_: str, seconds: float, limit: int
) -> int | None:
    """Delete up to ``limit`` expired jobs of one status and type in one transaction; None
    when another worker holds the pruning lock."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNE_LOCK):
            return None
        deleted = await conn.fetchval(_DELETE, status.value, type_, seconds, limit)
    return int(deleted)


@dataclass
class Pruned:
    """What one pass did: rows deleted per status, and whether it stopped early."""

    deleted: dict[JobStatus, int] = field(default_factory=dict)
    busy: bool = False  # another worker holds the lock: nothing done
    more: bool = False  # the time budget ran out with full batches still coming

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


async def prune_pass(
    conn: asyncpg.Connection,
    policy: Policy,
    *,
    batch: int = PRUNE_BATCH,
    budget_seconds: float = 5.0,
    statuses: Iterable[JobStatus] = (JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.DEAD),
) -> Pruned:
    """Delete expired finished jobs in batches until none is left or ``budget_seconds`` ran
    out (then ``more`` is set and the caller comes back soon)."""
    pruned = Pruned()
    deadline = time.monotonic() + budget_seconds
    for status in statuses:
        for type_ in await finished_types(conn, status):
            seconds = policy.seconds(status, type_)
            if seconds <= 0:
                continue
            while True:
                n = await prune_batch(conn, status, type_, seconds, batch)
                if n is None:
                    pruned.busy = True
                    return pruned
                pruned.deleted[status] = pruned.deleted.get(status, 0) + n
                if n < batch:
                    break
                if time.monotonic() > deadline:
                    pruned.more = True
                    return pruned
    return pruned
