"""Dispatch marks and Redis data epochs: which queued jobs have a stream entry.

``dispatched_at`` set on a ``queued`` job is its *dispatch mark*: "a stream entry for this turn
exists". The sweep sends every queued job without one, so a mark must never stay on a job whose
entry is gone. Marks are set by a confirmation after the XADD, cleared when a job is queued
again, and forgotten wholesale when Redis may have lost entries (a new data epoch).

A Redis data epoch per queue partition is recorded in ``conveyor_state``; recording a new one
(or a loss) bumps the row's ``updated_at``. Confirmations share-lock those rows and refuse every
XADD sent before the last record, so a confirmation and a loss record always see each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.jobs.repository import Target
from app.streams.keys import DEFAULT_BAND, HIGH_BAND, LOW_BAND

EPOCH_KEY_PREFIX = "redis-epoch:"  # conveyor_state keys of the Redis data epochs

_EPOCHS_SHARED = "SELECT FROM conveyor_state WHERE starts_with(key, :epochs) FOR SHARE"
# Rows are locked in id order, as every statement that locks many queued jobs does (the claim,
# forget_dispatches): two such statements never wait on each other in a cycle (deadlock). A row
# locked by someone else is skipped: a claim is taking it (no mark needed), and anything else
# leaves it to the sweep, whose duplicate send is harmless.
_CONFIRM = """
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:ages AS float8[]), CAST(:entries AS text[]))
        AS v(id, age, entry)
), mine AS (
    SELECT j.id, v.entry FROM jobs j JOIN v ON j.id = v.id
    WHERE j.status = 'queued' AND j.dispatched_at IS NULL
      AND j.enqueued_at <= statement_timestamp() - make_interval(secs => v.age)
      AND NOT EXISTS (
          SELECT FROM conveyor_state s WHERE starts_with(s.key, :epochs)
          AND s.updated_at > statement_timestamp() - make_interval(secs => v.age))
    ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs j SET dispatched_at = now(), dispatch_entry = mine.entry
FROM mine WHERE j.id = mine.id
"""


@dataclass(frozen=True)
class Sent:
    """One XADD to confirm: the job, seconds since the XADD was sent, the entry id it made."""

    job_id: UUID
    ago: float
    entry: str


async def confirm_dispatched(
    session: AsyncSession, sent: Sequence[Sent], redis_prefix: str
) -> None:
    """Record that the stream entries of these jobs exist (the dispatch mark, with the entry
    id so that a worker can later check that it still exists).

    ``ago``: seconds since each XADD was sent. A job queued again after its XADD (it ran,
    failed and was promoted meanwhile) is left unmarked: that entry was for its previous turn,
    and the sweep must send it again. So is every job sent before a loss of Redis data was
    detected (a data epoch of ``redis_prefix`` recorded since): its entry may be gone, and the
    loss's re-dispatch may have run already.
    """
    if sent:
        epochs = f"{EPOCH_KEY_PREFIX}{redis_prefix}:"
        # Serialise with a data-loss record (record_epoch updates these rows): one in flight
        # is waited for, so the UPDATE's fresh snapshot sees it; one that comes later waits
        # for our commit, and the re-dispatch that follows it sees our marks.
        await session.execute(text(_EPOCHS_SHARED), {"epochs": epochs})
        params = {
            "ids": [s.job_id for s in sent],
            "ages": [s.ago for s in sent],
            "entries": [s.entry for s in sent],
            "epochs": epochs,
        }
        await session.execute(text(_CONFIRM), params)


async def unmark_dispatched(session: AsyncSession, ids: Sequence[UUID]) -> None:
    """These queued jobs' entries are about to be deleted: until a new send is confirmed, the
    sweep must treat them as never sent."""
    if ids:
        await session.execute(
            text(
                "UPDATE jobs SET dispatched_at = NULL"
                " WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'"
            ),
            {"ids": list(ids)},
        )


# -- the undispatched sweep: per queue and priority band, oldest first --------------------------

# The band as ix_jobs_undispatched spells it (app.db.models.PRIORITY_SIGN_SQL), so that the
# planner matches it: the sign of the priority, 1 high, 0 default, -1 low.
_SIGNS = {HIGH_BAND: 1, DEFAULT_BAND: 0, LOW_BAND: -1}
# The oldest undispatched job of each band: min() over an index prefix is one index probe
# (the planner's min/max path), whereas an EXISTS may be planned as a scan that stops at the
# first match, which is the whole table when there is none.
_BANDS_WAITING = """
SELECT q.queue, statement_timestamp() - make_interval(secs => :grace) AS horizon,
    (SELECT min(enqueued_at) FROM jobs WHERE status = 'queued' AND dispatched_at IS NULL
     AND queue = q.queue AND least(greatest(priority, -1), 1) = 1) AS b0,
    (SELECT min(enqueued_at) FROM jobs WHERE status = 'queued' AND dispatched_at IS NULL
     AND queue = q.queue AND least(greatest(priority, -1), 1) = 0) AS b1,
    (SELECT min(enqueued_at) FROM jobs WHERE status = 'queued' AND dispatched_at IS NULL
     AND queue = q.queue AND least(greatest(priority, -1), 1) = -1) AS b2
FROM unnest(CAST(:queues AS text[])) AS q(queue)
"""
_WAITING_PAGE = """
SELECT id, enqueued_at FROM jobs
WHERE status = 'queued' AND dispatched_at IS NULL AND queue = :queue
  AND least(greatest(priority, -1), 1) = :sign
  AND enqueued_at < statement_timestamp() - make_interval(secs => :grace)
  AND (enqueued_at, id) > (:at, :id)
ORDER BY enqueued_at, id LIMIT :limit
"""
_LOCK_WAITING = """
SELECT id, queue, priority FROM jobs
WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued' AND dispatched_at IS NULL
ORDER BY enqueued_at, id FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True)
class Waiting:
    """An undispatched queued job, read without a lock; ``at`` and ``id`` are its place."""

    id: UUID
    at: datetime


FIRST = Waiting(UUID(int=0), datetime.min.replace(tzinfo=UTC))  # before every job


async def undispatched_bands(
    session: AsyncSession, queues: Sequence[str], grace_seconds: float
) -> list[tuple[str, int]]:
    """The (queue, band) pairs that have a queued job unconfirmed for ``grace_seconds``: one
    statement of three index probes per queue, so an idle sweep costs next to nothing."""
    params = {"queues": list(queues), "grace": grace_seconds}
    rows = await session.execute(text(_BANDS_WAITING), params)
    bands = ((HIGH_BAND, "b0"), (DEFAULT_BAND, "b1"), (LOW_BAND, "b2"))
    return [
        (r.queue, band)
        for r in rows
        for band, column in bands
        if (oldest := getattr(r, column)) is not None and oldest < r.horizon
    ]


async def undispatched_page(
    session: AsyncSession, queue: str, band: int, grace_seconds: float, after: Waiting, limit: int
) -> list[Waiting]:
    """The next ``limit`` undispatched jobs of one queue and band after ``after``, oldest
    first (not locked: the caller locks those whose streams have room)."""
    params = {"queue": queue, "sign": _SIGNS[band], "grace": grace_seconds, "limit": limit}
    result = await session.execute(text(_WAITING_PAGE), params | {"at": after.at, "id": after.id})
    return [Waiting(r.id, r.enqueued_at) for r in result]


async def lock_undispatched(session: AsyncSession, ids: Sequence[UUID]) -> list[Target]:
    """Lock those of ``ids`` still queued and unconfirmed (skipping rows another worker holds),
    oldest first; they stay locked until the caller commits."""
    if not ids:
        return []
    result = await session.execute(text(_LOCK_WAITING), {"ids": list(ids)})
    return [Target(r.id, r.queue, r.priority) for r in result]


# -- the entry check: marks whose entries may be gone ---------------------------------------------

_QUEUED_PAGE = """
SELECT id, priority, created_at, dispatch_entry,
    dispatched_at < statement_timestamp() - make_interval(secs => :older) AS old
FROM jobs WHERE queue = :queue AND status = 'queued' AND (created_at, id) < (:at, :id)
ORDER BY created_at DESC, id DESC LIMIT :limit
"""
_UNMARK_LOST = """
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:entries AS text[])) AS v(id, entry)
), mine AS (
    SELECT j.id FROM jobs j JOIN v ON j.id = v.id
    WHERE j.status = 'queued' AND j.dispatched_at IS NOT NULL
      AND j.dispatch_entry IS NOT DISTINCT FROM v.entry
    ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs j SET dispatched_at = NULL FROM mine WHERE j.id = mine.id
RETURNING j.id, j.queue, j.priority, j.enqueued_at
"""


@dataclass(frozen=True)
class Marked:
    """A queued job; ``old`` when it was marked dispatched longer ago than asked."""

    id: UUID
    priority: int
    created_at: datetime
    entry: str | None
    old: bool


LATEST = Marked(UUID(int=(1 << 128) - 1), 0, datetime.max.replace(tzinfo=UTC), None, False)


async def queued_page(
    session: AsyncSession, queue: str, older_than: float, after: Marked, limit: int
) -> list[Marked]:
    """The next ``limit`` queued jobs of ``queue``, newest first from ``after`` (the open
    listing index), each flagged ``old`` when its dispatch mark is older than ``older_than``
    seconds. Reads ``limit`` rows whatever their marks, so a pass costs the same every time."""
    params = {"queue": queue, "older": older_than, "limit": limit}
    keyset = {"at": after.created_at, "id": after.id}
    result = await session.execute(text(_QUEUED_PAGE), params | keyset)
    return [Marked(r.id, r.priority, r.created_at, r.dispatch_entry, bool(r.old)) for r in result]


async def unmark_lost(session: AsyncSession, marked: Sequence[Marked]) -> list[Target]:
    """Unmark the jobs still queued with the same mark (locked until the caller commits),
    oldest first, to be sent again."""
    if not marked:
        return []
    params = {"ids": [m.id for m in marked], "entries": [m.entry for m in marked]}
    rows = sorted(
        await session.execute(text(_UNMARK_LOST), params), key=lambda r: (r.enqueued_at, r.id)
    )
    return [Target(r.id, r.queue, r.priority) for r in rows]


# -- Redis data epochs and losses ------------------------------------------------------------------


def epoch_key(redis_prefix: str, queue: str, partition: int) -> str:
    """The ``conveyor_state`` key of a queue partition's Redis data epoch."""
    return f"{EPOCH_KEY_PREFIX}{redis_prefix}:{queue}:{partition}"


async def record_epoch(session: AsyncSession, key: str, epoch: str) -> bool:
    """Remember the Redis data epoch; True when it differs from the one recorded before
    (or none was), which means Redis may have lost entries since."""
    changed = await session.scalar(
        text(
            "INSERT INTO conveyor_state (key, value) VALUES (:key, :epoch)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()"
            " WHERE conveyor_state.value <> excluded.value RETURNING key"
        ),
        {"key": key, "epoch": epoch},
    )
    return changed is not None


async def record_loss(session: AsyncSession, keys: Sequence[str]) -> None:
    """Stream entries of these partitions were lost while their data epoch stayed (a stream
    deleted or evicted): bump the epoch records, so confirmations of earlier XADDs are
    refused, exactly as after a new epoch. Follow with :func:`forget_dispatches`."""
    if keys:
        await session.execute(
            text("UPDATE conveyor_state SET updated_at = now() WHERE key = ANY(:keys)"),
            {"keys": list(keys)},
        )


# Locks in id order (see _CONFIRM): with claims running on a backlog, an UPDATE in the order
# of some index deadlocked with them.
_FORGET = """
UPDATE jobs j SET dispatched_at = NULL
FROM (
    SELECT id FROM jobs WHERE status = 'queued' AND dispatched_at IS NOT NULL
      AND queue = ANY(CAST(:queues AS text[]))
    ORDER BY id FOR UPDATE
) mine
WHERE j.id = mine.id AND j.status = 'queued'
"""


async def forget_dispatches(session: AsyncSession, queues: Sequence[str]) -> int:
    """After Redis lost data: every queued job of these queues must be sent again.

    Call it after :func:`record_epoch` or :func:`record_loss` in the same transaction:
    confirmations in flight (which share-lock the epoch rows) have committed by then, so
    their marks are cleared too.
    """
    result = await session.execute(text(_FORGET), {"queues": list(queues)})
    return int(getattr(result, "rowcount", 0) or 0)
