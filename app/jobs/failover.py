"""Which PostgreSQL server holds the record, and what a switch to another one means.

A promoted replica, or a restore from a backup, is a different history of the record: with
asynchronous replication it may lack the last commits of the old primary. Its *identity* is
the cluster's system identifier (kept by ``pg_basebackup``, new after ``initdb``) and its
timeline (raised by every promotion and point-in-time recovery). Every worker's reconcile
compares it with the one recorded in ``conveyor_state``; when it changed, the dispatch marks
of every queued job are forgotten, so the sweep sends them all again (as after a Redis data
loss, ``app.jobs.redispatch``): a job the new server shows queued and dispatched may have had
its entry consumed, acked and deleted by a claim that only the old server saw. Duplicates are
harmless (the guarded claim); entries of jobs the new server never heard of find no row to
claim and are dropped (acked) by the reader. A claim only the old server saw also took its
increment of the job's fencing token with it, so the switch raises the floor of every token
handed out from then on (``CLAIM_FLOOR_KEY``): the lost claim's attempt, if it still runs,
is fenced off like any stale one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

IDENTITY_KEY = "postgres-identity"  # the conveyor_state row of the server's identity
# The conveyor_state row of the claim tokens' floor (a claim's new token is above it: see
# app.jobs.attempts._CLAIM). Every switch raises it by a
# step no job's token can climb in one server's history, so no token the old server handed
# out is handed out again by the new one.
CLAIM_FLOOR_KEY = "claim-token-floor"
CLAIM_FLOOR_STEP = 1 << 32

# The timeline of the control file's last checkpoint lags a promotion until the checkpoint
# that follows it completes; the current WAL file's name carries the timeline at once (its
# first 8 hex digits), but only outside recovery.
_IDENTITY = """
SELECT s.system_identifier::text AS system,
    CASE WHEN pg_is_in_recovery() THEN c.timeline_id
    ELSE greatest(c.timeline_id,
        ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int)
    END AS timeline
FROM pg_control_system() s, pg_control_checkpoint() c
"""
_PREVIOUS = "SELECT value FROM conveyor_state WHERE key = :key FOR UPDATE"
_RECORD = """
INSERT INTO conveyor_state (key, value) VALUES (:key, :value)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()
"""
_RAISE_FLOOR = """
INSERT INTO conveyor_state (key, value) VALUES (:key, CAST(CAST(:step AS bigint) AS text))
ON CONFLICT (key) DO UPDATE
SET value = CAST(CAST(conveyor_state.value AS bigint) + CAST(:step AS bigint) AS text),
    updated_at = now()
"""
# In id order, like the claims that may run meanwhile (app.jobs.marks._FORGET says why).
_FORGET_ALL = """
UPDATE jobs j SET dispatched_at = NULL
FROM (
    SELECT id FROM jobs WHERE status = 'queued' AND dispatched_at IS NOT NULL
    ORDER BY id FOR UPDATE
) mine
WHERE j.id = mine.id AND j.status = 'queued'
"""


@dataclass(frozen=True)
class Switch:
    """The record moved from the server ``before`` to ``after`` (``system:timeline`` each)."""

    before: str
    after: str
    forgotten: int  # queued jobs whose dispatch marks were forgotten


async def server_identity(session: AsyncSession) -> str | None:
    """``system_identifier:timeline`` of the server, or None where it cannot be read (the
    functions are missing or not granted: a Postgres-compatible service); call it in a
    transaction of its own, which an error leaves unusable."""
    try:
        row = (await session.execute(text(_IDENTITY))).one()
    except DBAPIError as exc:
        log.debug("the server's identity cannot be read: %s", exc)
        return None
    return f"{row.system}:{row.timeline}"


async def record_identity(session: AsyncSession, identity: str) -> Switch | None:
    """Record the server's identity; on a change (not on the first record) raise the claim
    tokens' floor and forget every dispatch mark in the same transaction, and return the
    switch."""
    previous = await session.scalar(text(_PREVIOUS), {"key": IDENTITY_KEY})
    if previous == identity:
        return None
    await session.execute(text(_RECORD), {"key": IDENTITY_KEY, "value": identity})
    if previous is None:
        return None
    await session.execute(text(_RAISE_FLOOR), {"key": CLAIM_FLOOR_KEY, "step": CLAIM_FLOOR_STEP})
    result = await session.execute(text(_FORGET_ALL))
    return Switch(str(previous), identity, int(getattr(result, "rowcount", 0) or 0))
