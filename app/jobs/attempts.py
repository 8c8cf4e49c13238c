"""The worker's transitions of an attempt, on asyncpg directly: claim, complete, heartbeat,
progress, release, reclaim. Each is one guarded statement over a batch, with its
``job_events`` rows (progress has none).

This is the hot path (a few statements per XREADGROUP batch), so it skips the ORM: prepared
statements (asyncpg caches them per connection), arrays in, tuples out, and a single
statement needs no explicit transaction. See ADR 0011.

The fencing token of an attempt is ``claim_token``: every claim increments it and nothing
ever lowers it (a release on shutdown gives the attempt back without counting it, and a
replay resets ``attempts``, but neither touches the token). Every later statement about the
attempt matches ``(id, claim_token)``, ``status = 'running'`` and the worker, so a stale
worker changes nothing (ADR 0003, ADR 0012). A switch to another Postgres server can lower
it: a claim only the old server saw is lost with its increment. So a claim raises the token
past the floor that every recorded switch raises (:mod:`app.jobs.failover`) as well.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict
from uuid import UUID

import asyncpg

from app.jobs.failover import CLAIM_FLOOR_KEY
from app.jobs.repository import Backoff, Target

# Backoff in SQL so every path (failure, lost worker) uses the Postgres clock and one formula:
# attempt n waits base * 2^(n-1), capped, with "equal jitter" (between half and all of it).
_BACKOFF = "least($RMAX::float8, $RBASE::float8 * power(2, j.attempts - 1)) * (0.5 + random() / 2)"
_OUT_OF_ATTEMPTS = "(j.attempts >= j.max_attempts)"


class ErrorRecord(TypedDict):
    """One entry of ``jobs.errors`` as a worker writes it; Postgres adds ``at``."""

    attempt: int
    error: str
    type: str
    traceback: str | None
    worker: str


@dataclass(slots=True)  # not frozen: built once per attempt (a frozen one is 8x slower)
class Claim:
    """An attempt this worker won: what its handler needs, and its fencing token."""

    id: UUID
    token: int
    attempt: int
    type: str
    queue: str
    max_attempts: int
    timeout_seconds: float | None
    payload: str  # JSON text
    traceparent: str | None = None  # the submission's trace context (ADR 0022)


@dataclass(slots=True)  # not frozen: built once per attempt, like Claim
class Completion:
    """The outcome of an attempt: ``result`` (JSON text) when it succeeded, else ``error``."""

    id: UUID
    token: int
    result: str | None
    error: ErrorRecord | None = None
    permanent: bool = False
    unknown_type: bool = False  # this worker has no handler for the type: see unknown_type.py
    cancelled: bool = False  # stopped on a cancel request (cancel_requested_at is set)
    defer_seconds: float | None = None  # RetryLater: ``error`` says why, if it counts after all


@dataclass(frozen=True, slots=True)
class Dead:
    """A job that went dead, for the DLQ notification."""

    id: UUID
    type: str
    queue: str
    attempts: int
    errors: str  # the error history as JSON text


# Statements about attempts named by id join them from ``v``, a materialized CTE that also
# carries the guard's values (``held``: 'running'; ``holder``: the worker). As join clauses,
# "j.status = v.held AND j.worker = v.holder" are the fencing guard all the same, but the
# planner neither matches them to ix_jobs_lease nor lets them shrink its estimate of the jobs
# side. With "j.status = 'running'" written out, a plan could start from the running rows
# (estimated at a row when the statistics were taken on a quiet table) and test each against
# every row of v: 250,000 comparisons, 53 ms, for 500 completions (decision 0029). Now the
# rows are found by primary key from v, or by a hash join.


def _backoff(sql: str, first: int) -> str:
    return sql.replace("$RBASE", f"${first}").replace("$RMAX", f"${first + 1}")


_CLAIM = f"""
WITH locked AS (
    -- Look rows up by primary key only: "status || ''" keeps the planner from intersecting
    -- with the status index, which holds every queued job (a deep backlog).
    SELECT id FROM jobs WHERE id = ANY($1::uuid[]) AND status || '' = 'queued'
    ORDER BY id FOR UPDATE
), claimed AS (
    UPDATE jobs j SET status = 'running', attempts = j.attempts + 1,
        claim_token = greatest(j.claim_token, (
            SELECT CAST(value AS bigint) FROM conveyor_state WHERE key = '{CLAIM_FLOOR_KEY}'
        )) + 1, worker = $2, started_at = now(),
        next_attempt_at = NULL, lease_expires_at = now() + make_interval(secs => $3),
        unique_until = NULL, progress = NULL
    FROM locked WHERE j.id = locked.id AND j.status = 'queued'
    RETURNING j.id, j.claim_token, j.attempts, j.type, j.queue, j.max_attempts,
        j.timeout_seconds, j.payload::text AS payload, j.traceparent
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, 'claimed', attempts, $2 FROM claimed
)
SELECT * FROM claimed
"""


async def claim_many(
    conn: asyncpg.Connection, ids: Sequence[UUID], worker: str, lease_seconds: float
) -> list[Claim]:
    """queued → running for every id still queued; the rest were taken, cancelled or done."""
    if not ids:
        return []
    rows = await conn.fetch(_CLAIM, ids, worker, lease_seconds)
    return [Claim(*r) for r in rows]


# The outcome of a reported attempt, as SQL over the job row ``j`` and the report ``v``:
# a deferral (RetryLater under the job's deferral budget) spends no attempt; a failure that
# ends the job (permanent, or the last attempt); a cancel (the attempt was stopped on request,
# or it would wait for another attempt while a cancel is pending). Success keeps its outcome.
_DEFERS = "(v.defer IS NOT NULL AND j.deferrals < $MAXDEF::int)"
_DIES = f"(v.error IS NOT NULL AND NOT {_DEFERS} AND (v.permanent OR {_OUT_OF_ATTEMPTS}))"
_CANCELS = (
    "(j.cancel_requested_at IS NOT NULL AND (v.cancelled"
    f" OR (v.error IS NOT NULL AND NOT {_DIES})))"
)
_ENDS = f"({_CANCELS} OR (v.error IS NULL AND NOT v.cancelled) OR {_DIES})"
_OVER_BUDGET = (
    "CASE WHEN v.defer IS NULL THEN v.error::jsonb ELSE v.error::jsonb || jsonb_build_object("
    "'error', 'deferred more than ' || $MAXDEF::int || ' times; ' || (v.error::jsonb->>'error'))"
    " END"
)

_COMPLETE = _backoff(
    f"""
WITH v AS MATERIALIZED (
    SELECT *, 'running'::text AS held, $6::text AS holder
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bool[], $9::bool[],
                $10::float8[]) AS v(id, token, result, error, permanent, cancelled, defer)
), done AS (
    UPDATE jobs j SET
        status = CASE WHEN {_CANCELS} THEN 'cancelled'
            WHEN v.error IS NULL THEN 'succeeded' WHEN {_DIES} THEN 'dead' ELSE 'retrying' END,
        result = CASE WHEN v.error IS NULL AND NOT v.cancelled THEN v.result::jsonb
            ELSE j.result END,
        errors = CASE WHEN v.error IS NULL OR ({_DEFERS} AND NOT {_CANCELS}) THEN j.errors
            ELSE j.errors || jsonb_build_array({_OVER_BUDGET} || jsonb_build_object('at', now()))
            END,
        attempts = CASE WHEN {_DEFERS} AND NOT {_CANCELS} THEN j.attempts - 1 ELSE j.attempts END,
        deferrals = CASE WHEN v.defer IS NULL THEN j.deferrals ELSE j.deferrals + 1 END,
        next_attempt_at = CASE WHEN {_ENDS} THEN NULL
            WHEN {_DEFERS} THEN now() + make_interval(secs => v.defer)
            ELSE now() + make_interval(secs => {_BACKOFF}) END,
        finished_at = CASE WHEN {_ENDS} THEN now() END,
        worker = NULL, lease_expires_at = NULL
    FROM v WHERE j.id = v.id AND j.claim_token = v.token AND j.status = v.held
        AND j.worker = v.holder AND (NOT v.cancelled OR j.cancel_requested_at IS NOT NULL)
    RETURNING j.id, j.status, j.attempts, j.type, j.queue,
        CASE WHEN j.status = 'dead' THEN j.errors::text END AS errors,
        (j.status = 'retrying' AND v.defer IS NOT NULL AND j.deferrals <= $11::int) AS deferred,
        j.cancel_requested_by,
        extract(epoch FROM now() - j.created_at)::float8 AS age
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker, actor)
    SELECT id, CASE WHEN deferred THEN 'deferred' WHEN status = 'retrying' THEN 'failed'
            ELSE status END,
        CASE WHEN deferred THEN attempts + 1 ELSE attempts END, $6,
        CASE WHEN status = 'cancelled' THEN cancel_requested_by END
    FROM done
)
SELECT id, status, attempts, type, queue, errors, age FROM done
""".replace("$MAXDEF", "$11"),
    7,
)


# The batch where every attempt succeeded (a drain's usual case): the same transition as
# _COMPLETE's success branch, without evaluating its other outcomes per row (11% less time
# per completion in batches of 500; docs/performance.md, tenth stop).
_SUCCEED = """
WITH v AS MATERIALIZED (
    SELECT *, 'running'::text AS held, $4::text AS holder
    FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS v(id, token, result)
), done AS (
    UPDATE jobs j SET status = 'succeeded', result = v.result::jsonb, next_attempt_at = NULL,
        finished_at = now(), worker = NULL, lease_expires_at = NULL
    FROM v WHERE j.id = v.id AND j.claim_token = v.token AND j.status = v.held
        AND j.worker = v.holder
    RETURNING j.id, j.attempts, extract(epoch FROM now() - j.created_at)::float8 AS age
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, 'succeeded', attempts, $4 FROM done
)
SELECT id, age FROM done
"""


def _succeeded(o: Completion) -> bool:
    return o.error is None and not o.cancelled and o.defer_seconds is None


async def complete_many(
    conn: asyncpg.Connection,
    worker: str,
    outcomes: Sequence[Completion],
    backoff: Backoff,
    *,
    max_deferrals: int = 50,
    ages: dict[UUID, float] | None = None,
) -> tuple[set[UUID], list[Dead]]:
    """running → succeeded, retrying (with backoff, or deferred by RetryLater), dead or
    cancelled (a cancel was requested), fenced by the claim token.

    Returns the ids that moved (the others were fenced off: a newer attempt, a cancel or a
    replay won) and the jobs that went dead. ``ages`` (when given) receives, for each job that
    became terminal, the seconds from its creation (the end-to-end histogram).
    """
    if not outcomes:
        return set(), []
    if all(_succeeded(o) for o in outcomes):
        rows = await conn.fetch(
            _SUCCEED,
            [o.id for o in outcomes],
            [o.token for o in outcomes],
            [o.result for o in outcomes],
            worker,
        )
        if ages is not None:
            ages.update((r[0], r[1]) for r in rows)
        return {r[0] for r in rows}, []
    rows = await conn.fetch(
        _COMPLETE,
        [o.id for o in outcomes],
        [o.token for o in outcomes],
        [o.result for o in outcomes],
        [None if o.error is None else json.dumps(o.error) for o in outcomes],
        [o.permanent for o in outcomes],
        worker,
        backoff.base_seconds,
        backoff.max_seconds,
        [o.cancelled for o in outcomes],
        [o.defer_seconds for o in outcomes],
        max_deferrals,
    )
    moved = {r[0] for r in rows}
    dead = [Dead(r[0], r[3], r[4], r[2], r[5]) for r in rows if r[1] == "dead"]
    if ages is not None:
        ages.update((r[0], r[6]) for r in rows if r[1] != "retrying")
    return moved, dead


_HEARTBEAT = """
WITH v AS MATERIALIZED (
    SELECT *, 'running'::text AS held, $3::text AS holder
    FROM unnest($1::uuid[], $2::bigint[]) AS v(id, token)
), mine AS (
    SELECT j.id FROM jobs j JOIN v ON j.id = v.id AND j.claim_token = v.token
    WHERE j.status = v.held AND j.worker = v.holder
    ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs j SET lease_expires_at = now() + make_interval(secs => $4)
FROM mine WHERE j.id = mine.id
RETURNING j.id, j.claim_token, j.cancel_requested_at IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class Leases:
    """What a heartbeat learnt: the attempts we still hold, and those asked to cancel."""

    held: set[tuple[UUID, int]]
    cancel: set[tuple[UUID, int]]


async def extend_leases(
    conn: asyncpg.Connection,
    worker: str,
    running: Sequence[tuple[UUID, int]],
    lease_seconds: float,
) -> Leases:
    """Keep the leases of our running attempts alive; returns the attempts we still hold and
    which of them a cancel was requested for (Postgres is the truth of both)."""
    if not running:
        return Leases(set(), set())
    ids = [r[0] for r in running]
    tokens = [r[1] for r in running]
    rows = await conn.fetch(_HEARTBEAT, ids, tokens, worker, lease_seconds)
    return Leases({(r[0], r[1]) for r in rows}, {(r[0], r[1]) for r in rows if r[2]})


_PROGRESS = """
WITH v AS MATERIALIZED (
    SELECT *, 'running'::text AS held, $4::text AS holder
    FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS v(id, token, progress)
), mine AS (
    -- SKIP LOCKED, in id order: a row being completed or reclaimed right now is skipped
    -- (its progress no longer matters), and two statements never wait on each other.
    SELECT j.id, v.progress FROM jobs j JOIN v ON j.id = v.id AND j.claim_token = v.token
    WHERE j.status = v.held AND j.worker = v.holder
    ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs j SET progress = mine.progress::jsonb
FROM mine WHERE j.id = mine.id
RETURNING j.id
"""


async def write_progress(
    conn: asyncpg.Connection, worker: str, updates: Sequence[tuple[UUID, int, str]]
) -> set[UUID]:
    """The latest progress (JSON text) of running attempts, fenced like every write of an
    attempt: ``(id, claim_token)``, ``running`` and this worker. Returns the ids written."""
    if not updates:
        return set()
    rows = await conn.fetch(
        _PROGRESS,
        [u[0] for u in updates],
        [u[1] for u in updates],
        [u[2] for u in updates],
        worker,
    )
    return {r[0] for r in rows}


_RELEASE = """
WITH v AS MATERIALIZED (
    SELECT *, 'running'::text AS held, $3::text AS holder
    FROM unnest($1::uuid[], $2::bigint[]) AS v(id, token)
), released AS (
    UPDATE jobs j SET
        status = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued' ELSE 'cancelled' END,
        attempts = j.attempts - 1, worker = NULL, lease_expires_at = NULL,
        started_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE j.started_at END,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        enqueued_at = now(), dispatched_at = NULL
    FROM v WHERE j.id = v.id AND j.claim_token = v.token AND j.status = v.held
        AND j.worker = v.holder
    RETURNING j.id, j.queue, j.priority, j.attempts, j.status, j.cancel_requested_by
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker, actor)
    SELECT id, CASE WHEN status = 'queued' THEN 'released' ELSE 'cancelled' END, attempts + 1,
        $3, CASE WHEN status = 'cancelled' THEN cancel_requested_by END
    FROM released
)
SELECT id, queue, priority FROM released WHERE status = 'queued'
"""


async def release_many(
    conn: asyncpg.Connection, worker: str, running: Sequence[tuple[UUID, int]]
) -> list[Target]:
    """running → queued on shutdown; the interrupted attempt does not count (its token
    stays used). A job asked to cancel ends ``cancelled`` instead; only the queued ones are
    returned (to send again)."""
    if not running:
        return []
    rows = await conn.fetch(_RELEASE, [r[0] for r in running], [r[1] for r in running], worker)
    return [Target(r[0], r[1], r[2]) for r in rows]


_RECLAIM = _backoff(
    f"""
WITH lost AS (
    SELECT id, worker AS lost_worker FROM jobs
    WHERE status = 'running' AND lease_expires_at < now()
      AND queue = ANY($1::text[]) AND ($2::uuid[] IS NULL OR id = ANY($2::uuid[]))
      AND NOT EXISTS (
          SELECT FROM unnest($3::uuid[], $4::bigint[]) AS live(id, token)
          WHERE live.id = jobs.id AND live.token = jobs.claim_token)
    ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs j SET
        status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
            WHEN {_OUT_OF_ATTEMPTS} THEN 'dead' ELSE 'retrying' END,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'error', 'worker lost', 'type', 'WorkerLost',
            'worker', j.worker, 'at', now())),
        next_attempt_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR {_OUT_OF_ATTEMPTS}
            THEN NULL ELSE now() + make_interval(secs => {_BACKOFF}) END,
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR {_OUT_OF_ATTEMPTS}
            THEN now() END,
        worker = NULL, lease_expires_at = NULL
    FROM lost WHERE j.id = lost.id
    RETURNING j.id, j.status, j.attempts, j.type, j.queue, j.errors::text AS errors,
        lost.lost_worker, j.cancel_requested_by
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker, actor)
    SELECT id, CASE WHEN status = 'retrying' THEN 'reclaimed' ELSE status END, attempts,
           lost_worker, CASE WHEN status = 'cancelled' THEN cancel_requested_by ELSE $6 END
    FROM upd
)
SELECT id, status, attempts, type, queue, errors FROM upd
""",
    7,
)


@dataclass(frozen=True, slots=True)
class Reclaimed:
    id: UUID
    status: str
    attempts: int
    type: str
    queue: str
    errors: str


async def reclaim_expired(
    conn: asyncpg.Connection,
    actor: str,
    backoff: Backoff,
    queues: Sequence[str],
    *,
    live: Sequence[tuple[UUID, int]] = (),
    ids: Sequence[UUID] | None = None,
    limit: int = 500,
) -> list[Reclaimed]:
    """running with a lapsed lease → the attempt failed with ``worker lost`` (retry or dead;
    ``cancelled`` when a cancel was requested: a cancelled job never runs again).

    ``live``: the attempts the caller runs itself; never reclaimed here, whatever their
    lease says (the caller's heartbeat renews it as soon as it reaches Postgres again).
    """
    rows = await conn.fetch(
        _RECLAIM,
        list(queues),
        None if ids is None else list(ids),
        [a[0] for a in live],
        [a[1] for a in live],
        limit,
        actor,
        backoff.base_seconds,
        backoff.max_seconds,
    )
    return [Reclaimed(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class State:
    id: UUID
    token: int
    status: str
    worker: str | None
    queue: str
    priority: int


async def states(conn: asyncpg.Connection, ids: Sequence[UUID]) -> list[State]:
    """Where these jobs stand now (for handing back deliveries on shutdown)."""
    if not ids:
        return []
    rows = await conn.fetch(
        "SELECT id, claim_token, status, worker, queue, priority FROM jobs"
        " WHERE id = ANY($1::uuid[])",
        ids,
    )
    return [State(*r) for r in rows]
