"""Jobs of a type this worker does not know: handed back for a while, dead after that.

In a rolling deploy the API may accept a new job type before every worker has its handler.
A worker that claims such a job does not fail it: it hands it back (``running → retrying``,
the attempt not counted, no error added; the claim token stays used), due again after a delay
that grows with the job's age (a tenth of it, from 1 s to 30 s), so that a worker without the
type does not spin on it and the job reaches workers that know it. Once the job has waited
``CONVEYOR_UNKNOWN_TYPE_GRACE_SECONDS`` since it became due (its creation or its ``run_at``,
whichever is later; on the Postgres clock), the next worker without the type makes it
``dead`` with the error ``unknown job type``.

Like every transition of an attempt (:mod:`app.jobs.attempts`), one statement on asyncpg,
fenced by ``(id, claim_token)``, ``status = 'running'`` and the worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from uuid import UUID

import asyncpg

from app.jobs.attempts import Completion, Dead

log = logging.getLogger(__name__)

MIN_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0
DELAY_FRACTION = 0.1  # of the job's age

_EXPIRED = "(greatest(j.created_at, j.run_at) <= now() - make_interval(secs => $5::float8))"
_DELAY = (
    "least($7::float8, greatest($6::float8,"
    " $8::float8 * extract(epoch FROM now() - greatest(j.created_at, j.run_at))::float8))"
)
_CANCEL = "(j.cancel_requested_at IS NOT NULL)"  # asked to cancel: never handed back
_ENDS = f"({_CANCEL} OR {_EXPIRED})"
_HAND_BACK = f"""
WITH v AS MATERIALIZED (
    SELECT *, 'running'::text AS held, $4::text AS holder
    FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS v(id, token, error)
), moved AS (
    UPDATE jobs j SET
        status = CASE WHEN {_CANCEL} THEN 'cancelled' WHEN {_EXPIRED} THEN 'dead'
            ELSE 'retrying' END,
        attempts = CASE WHEN {_ENDS} THEN j.attempts ELSE j.attempts - 1 END,
        errors = CASE WHEN {_ENDS} THEN j.errors || jsonb_build_array(
            v.error::jsonb || jsonb_build_object('at', now())) ELSE j.errors END,
        next_attempt_at = CASE WHEN {_ENDS} THEN NULL
            ELSE now() + make_interval(secs => {_DELAY}) END,
        finished_at = CASE WHEN {_ENDS} THEN now() END,
        started_at = CASE WHEN {_ENDS} THEN j.started_at END,
        worker = NULL, lease_expires_at = NULL
    FROM v WHERE j.id = v.id AND j.claim_token = v.token AND j.status = v.held
        AND j.worker = v.holder
    RETURNING j.id, j.status, j.attempts, j.type, j.queue, j.next_attempt_at,
        CASE WHEN j.status = 'dead' THEN j.errors::text END AS errors, j.cancel_requested_by
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker, actor)
    SELECT id, CASE WHEN status = 'retrying' THEN 'released' ELSE status END,
           CASE WHEN status = 'retrying' THEN attempts + 1 ELSE attempts END, $4,
           CASE WHEN status = 'cancelled' THEN cancel_requested_by END
    FROM moved
)
SELECT * FROM moved
"""


async def hand_back(
    conn: asyncpg.Connection,
    worker: str,
    outcomes: Sequence[Completion],
    grace_seconds: float,
) -> tuple[set[UUID], list[Dead]]:
    """running → retrying (not an attempt) within the grace, → dead after it; fenced by the
    claim token like every outcome. Returns the ids that moved and the jobs that went dead."""
    if not outcomes:
        return set(), []
    rows = await conn.fetch(
        _HAND_BACK,
        [o.id for o in outcomes],
        [o.token for o in outcomes],
        [json.dumps(o.error or {}) for o in outcomes],
        worker,
        grace_seconds,
        MIN_DELAY_SECONDS,
        MAX_DELAY_SECONDS,
        DELAY_FRACTION,
    )
    dead: list[Dead] = []
    for row in rows:
        if row["status"] == "cancelled":
            continue  # a cancel was asked: it ends here, whatever its type
        if row["status"] == "dead":
            dead.append(Dead(row["id"], row["type"], row["queue"], row["attempts"], row["errors"]))
            log.warning(
                "unknown job type %r (for %.0fs): the job is dead",
                row["type"],
                grace_seconds,
                extra={"job_id": str(row["id"])},
            )
        else:
            due = row["next_attempt_at"]
            log.warning(
                "unknown job type %r: handed the job back for other workers (due again at %s)",
                row["type"],
                due.isoformat() if due else "?",
                extra={"job_id": str(row["id"])},
            )
    return {r["id"] for r in rows}, dead
