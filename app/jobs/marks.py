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
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.jobs.repository import Target

EPOCH_KEY_PREFIX = "redis-epoch:"  # conveyor_state keys of the Redis data epochs

_EPOCHS_SHARED = "SELECT FROM conveyor_state WHERE starts_with(key, :epochs) FOR SHARE"
_CONFIRM = """
UPDATE jobs j SET dispatched_at = now()
FROM unnest(CAST(:ids AS uuid[]), CAST(:ages AS float8[])) AS v(id, age)
WHERE j.id = v.id AND j.status = 'queued' AND j.dispatched_at IS NULL
  AND j.enqueued_at <= statement_timestamp() - make_interval(secs => v.age)
  AND NOT EXISTS (
      SELECT FROM conveyor_state s WHERE starts_with(s.key, :epochs)
      AND s.updated_at > statement_timestamp() - make_interval(secs => v.age))
"""


async def confirm_dispatched(
    session: AsyncSession,
    ids: Sequence[UUID],
    sent_ago: Sequence[float],
    redis_prefix: str,
) -> None:
    """Record that the stream entries of these jobs exist (the dispatch mark).

    ``sent_ago``: seconds since each XADD was sent. A job queued again after its XADD (it ran,
    failed and was promoted meanwhile) is left unmarked: that entry was for its previous turn,
    and the sweep must send it again. So is every job sent before a loss of Redis data was
    detected (a data epoch of ``redis_prefix`` recorded since): its entry may be gone, and the
    loss's re-dispatch may have run already.
    """
    if ids:
        epochs = f"{EPOCH_KEY_PREFIX}{redis_prefix}:"
        # Serialise with a data-loss record (record_epoch updates these rows): one in flight
        # is waited for, so the UPDATE's fresh snapshot sees it; one that comes later waits
        # for our commit, and the re-dispatch that follows it sees our marks.
        await session.execute(text(_EPOCHS_SHARED), {"epochs": epochs})
        params = {"ids": list(ids), "ages": list(sent_ago), "epochs": epochs}
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


async def lock_undispatched(
    session: AsyncSession, queues: Sequence[str], grace_seconds: float, limit: int = 1000
) -> list[Target]:
    """Queued jobs whose stream entry was never confirmed; locked until the caller commits."""
    result = await session.execute(
        text(
            "SELECT id, queue, priority FROM jobs WHERE status = 'queued'"
            " AND dispatched_at IS NULL AND queue = ANY(CAST(:queues AS text[]))"
            " AND enqueued_at < now() - make_interval(secs => :grace)"
            " ORDER BY enqueued_at LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"grace": grace_seconds, "limit": limit, "queues": list(queues)},
    )
    return [Target(r.id, r.queue, r.priority) for r in result]


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


async def forget_dispatches(session: AsyncSession, queues: Sequence[str]) -> int:
    """After Redis lost data: every queued job of these queues must be sent again.

    Call it after :func:`record_epoch` in the same transaction: confirmations in flight
    (which share-lock the epoch rows) have committed by then, so their marks are cleared too.
    """
    result = await session.execute(
        text(
            "UPDATE jobs SET dispatched_at = NULL WHERE status = 'queued'"
            " AND dispatched_at IS NOT NULL AND queue = ANY(CAST(:queues AS text[]))"
        ),
        {"queues": list(queues)},
    )
    return int(getattr(result, "rowcount", 0) or 0)
