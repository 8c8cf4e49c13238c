"""The claim under limits: the hot path's claim when some limit is in force (ADR 0014).

Without limits the worker claims with :func:`app.jobs.attempts.claim_many` alone. With them,
one transaction (on the worker's asyncpg connection) does:

1. lock the delivered jobs still ``queued`` (as the plain claim does), and learn their types;
2. lock the ``flow_controls`` rows of the limits those jobs fall under, in key order (created
   on first use): every claim of a limited type or queue, on any worker, queues up here, so
   the next two steps see every claim committed before;
3. count the running attempts per limited type and queue (a SIGKILLed worker's attempts
   stop counting when their lapsed leases are reclaimed: no slot leaks), and refill the
   token buckets from the Postgres clock;
4. admit jobs in delivery order while every limit they fall under has room, claim those, and
   spend the tokens;
5. hold back the others: they stay ``queued``, lose their dispatch mark, and are re-sent
   after a delay that estimates when room comes (see :class:`Held`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg

from app.flow.limits import Limits
from app.jobs.attempts import _CLAIM, Claim, claim_many
from app.jobs.repository import Target

Key = tuple[str, str]  # ("type" | "queue", name)
MAX_DELAY_SECONDS = 3600.0

_LOCK_JOBS = """
SELECT id, type, queue, priority FROM jobs
WHERE id = ANY($1::uuid[]) AND status || '' = 'queued' ORDER BY id FOR UPDATE
"""
_ENSURE_KEYS = """
INSERT INTO flow_controls (scope, name) SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
"""
# The bucket's clock is clock_timestamp(), read once the row is locked: now() is the start of
# the transaction, before the wait for the lock, and would refill too much.
_LOCK_KEYS = """
SELECT scope, name, tokens, extract(epoch FROM clock_timestamp() - refilled_at)::float8,
    clock_timestamp()
FROM flow_controls WHERE (scope, name) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY scope, name FOR UPDATE
"""
# Every running attempt counts, until its outcome is written or, for a worker that died, until
# its lapsed lease is reclaimed (XAUTOCLAIM or reconcile, in any worker): a late heartbeat or
# a slow report must not let a second job in while the first still runs. The running rows are
# few, and ix_jobs_lease holds exactly them.
_RUNNING = """
SELECT 'type' AS scope, type AS name, count(*) AS n FROM jobs
WHERE status = 'running' AND lease_expires_at > '-infinity' AND type = ANY($1::text[])
GROUP BY type
UNION ALL
SELECT 'queue', queue, count(*) FROM jobs
WHERE status = 'running' AND lease_expires_at > '-infinity' AND queue = ANY($2::text[])
GROUP BY queue
"""
_SPEND = """
UPDATE flow_controls f SET tokens = v.tokens, refilled_at = v.at
FROM unnest($1::text[], $2::text[], $3::float8[], $4::timestamptz[]) AS v(scope, name, tokens, at)
WHERE f.scope = v.scope AND f.name = v.name
"""
# The plain claim, stamped with the time the limits admitted the jobs (the buckets' clock),
# so that started_at and the claimed event order the starts as the buckets admitted them.
_CLAIM_AT = _CLAIM.replace("started_at = now()", "started_at = $4::timestamptz").replace(
    "INSERT INTO job_events (job_id, event, attempt, worker)\n"
    "    SELECT id, 'claimed', attempts, $2",
    "INSERT INTO job_events (job_id, event, attempt, worker, at)\n"
    "    SELECT id, 'claimed', attempts, $2, $4::timestamptz",
)
if _CLAIM_AT.count("$4::timestamptz") != 2:  # pragma: no cover - the claim's text changed
    raise RuntimeError("app.flow.claim: update _CLAIM_AT to the claim statement")

# A held job starts a new queued turn: enqueued_at moves on, so a late confirmation of the
# entry just deleted cannot mark it (app.jobs.marks), and the sweep re-sends it only
# ``later`` seconds after the dispatch grace, if the worker that held it did not first.
_HOLD = """
WITH v AS (
    SELECT * FROM unnest($1::uuid[], $2::float8[]) AS v(id, later)
), mine AS (  -- locked in id order, like the claim (app.jobs.marks._CONFIRM says why)
    SELECT j.id, v.later FROM jobs j JOIN v ON j.id = v.id
    WHERE j.status = 'queued' ORDER BY j.id FOR UPDATE OF j
)
UPDATE jobs j SET dispatched_at = NULL, enqueued_at = now() + make_interval(secs => mine.later)
FROM mine WHERE j.id = mine.id
"""


@dataclass(frozen=True, slots=True)
class Held:
    """A job a limit held back: still ``queued``; worth sending again in ``delay`` seconds."""

    target: Target
    delay: float


@dataclass
class _Room:
    """What one limit lets this claim start, and how long the jobs it refuses should wait."""

    limits: Limits
    retry_seconds: float
    free: int = 0  # concurrency room
    tokens: float = math.inf  # rate tokens after the refill
    spent: int = 0
    refused: int = 0
    at: datetime | None = None  # the bucket's clock at this claim
    rated: bool = field(init=False)

    def __post_init__(self) -> None:
        self.rated = self.limits.rate_count is not None
        if self.limits.concurrency is None:
            self.free = 1 << 30

    def admits(self) -> bool:
        return self.free > 0 and self.tokens - self.spent >= 1

    def take(self) -> None:
        self.free -= 1
        self.spent += 1

    def refuse(self) -> float:
        """Count a refusal; the delay before that job is worth another try."""
        i = self.refused
        self.refused += 1
        if self.rated and self.tokens - self.spent < 1:  # the (i+1)-th next token
            rate = self.limits.refill_per_second
            return min(MAX_DELAY_SECONDS, (i + 1 - (self.tokens - self.spent)) / rate)
        concurrency = self.limits.concurrency or 1  # a wave of retries per free slot
        return min(30 * self.retry_seconds, self.retry_seconds * (1 + i // concurrency))

    def refill(self, tokens: float | None, elapsed: float | None, at: datetime) -> None:
        self.at = at
        if not self.rated:
            return
        capacity = self.limits.capacity
        if tokens is None or elapsed is None:
            self.tokens = float(capacity)
        else:
            self.tokens = min(capacity, tokens + max(0.0, elapsed) * self.limits.refill_per_second)


async def claim_limited(
    conn: asyncpg.Connection,
    ids: Sequence[UUID],
    worker: str,
    lease_seconds: float,
    limits: Mapping[Key, Limits],
    *,
    retry_seconds: float,
    dispatch_grace: float,
) -> tuple[list[Claim], list[Held]]:
    """queued → running for the delivered jobs that every limit they fall under admits;
    the others limited are held back (:class:`Held`). ``limits``: those in force, by key."""
    if not ids:
        return [], []
    async with conn.transaction():
        rows = await conn.fetch(_LOCK_JOBS, ids)
        order = {job_id: i for i, job_id in enumerate(ids)}
        rows.sort(key=lambda r: order[r[0]])
        keys = sorted({k for r in rows for k in (("type", r[1]), ("queue", r[2])) if k in limits})
        if not keys:
            return await claim_many(conn, [r[0] for r in rows], worker, lease_seconds), []
        rooms = await _rooms(conn, keys, limits, retry_seconds)
        admitted: list[UUID] = []
        held: list[Held] = []
        for job_id, type_, queue, priority in rows:
            mine = [rooms[k] for k in (("type", type_), ("queue", queue)) if k in rooms]
            refusing = [room for room in mine if not room.admits()]
            if refusing:
                delay = max(room.refuse() for room in refusing)
                held.append(Held(Target(job_id, queue, priority), delay))
                continue
            for room in mine:
                room.take()
            admitted.append(job_id)
        at = next(iter(rooms.values())).at
        rows = await conn.fetch(_CLAIM_AT, admitted, worker, lease_seconds, at)
        claims = [Claim(*r) for r in rows]
        rated = [(k, r) for k, r in rooms.items() if r.rated]
        if rated:
            await conn.execute(
                _SPEND,
                [k[0] for k, _ in rated],
                [k[1] for k, _ in rated],
                [r.tokens - r.spent for _, r in rated],
                [r.at for _, r in rated],
            )
        if held:
            await conn.execute(
                _HOLD,
                [h.target.id for h in held],
                [max(0.0, h.delay - dispatch_grace) for h in held],
            )
    return claims, held


async def _rooms(
    conn: asyncpg.Connection, keys: list[Key], limits: Mapping[Key, Limits], retry: float
) -> dict[Key, _Room]:
    scopes, names = [k[0] for k in keys], [k[1] for k in keys]
    rows = await conn.fetch(_LOCK_KEYS, scopes, names)
    if len(rows) < len(keys):  # first use of a limit: make its row (once), then lock them all
        await conn.execute(_ENSURE_KEYS, scopes, names)
        rows = await conn.fetch(_LOCK_KEYS, scopes, names)
    state = {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}
    rooms = {k: _Room(limits[k], retry) for k in keys}
    counted = [k for k in keys if limits[k].concurrency is not None]
    running: dict[Key, int] = {}
    if counted:
        types = [n for s, n in counted if s == "type"]
        queues = [n for s, n in counted if s == "queue"]
        running = {(r[0], r[1]): r[2] for r in await conn.fetch(_RUNNING, types, queues)}
    for key, room in rooms.items():
        if room.limits.concurrency is not None:
            room.free = max(0, room.limits.concurrency - running.get(key, 0))
        room.refill(*state[key])
    return rooms


async def hold(conn: asyncpg.Connection, ids: Sequence[UUID]) -> None:
    """Jobs delivered from a paused queue: their entries are about to be deleted, so the
    sweep must send them again (into the stream, where they wait for the resume)."""
    if ids:
        await conn.execute(_HOLD, list(ids), [0.0] * len(ids))
