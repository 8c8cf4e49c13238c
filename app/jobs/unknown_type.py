"""Jobs of a type this worker does not know: handed back for a while, dead after that.

In a rolling deploy the API may accept a new job type before every worker has its handler.
A worker that claims such a job does not fail it: it hands it back (``running → retrying``,
the attempt not counted, no error added), due again after a delay that grows with the job's
age (a tenth of it, from 1 s to 30 s), so that a worker without the type does not spin on it
and the job reaches workers that know it. Once the job has waited
``CONVEYOR_UNKNOWN_TYPE_GRACE_SECONDS`` since it became due (its creation or its ``run_at``,
whichever is later; on the Postgres clock), the next worker without the type makes it
``dead`` with the error ``unknown job type``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import JobRow
from app.jobs.repository import Failure

log = logging.getLogger(__name__)

MIN_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0
DELAY_FRACTION = 0.1  # of the job's age

_EXPIRED = "(greatest(j.created_at, j.run_at) <= now() - make_interval(secs => :grace))"
_DELAY = (
    "least(CAST(:max_delay AS float8), greatest(CAST(:min_delay AS float8),"
    " :fraction * extract(epoch FROM now() - greatest(j.created_at, j.run_at))))"
)
_HAND_BACK = f"""
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]),
                         CAST(:errors AS text[])) AS v(id, attempt, error)
), moved AS (
    UPDATE jobs j SET
        status = CASE WHEN {_EXPIRED} THEN 'dead' ELSE 'retrying' END,
        attempts = CASE WHEN {_EXPIRED} THEN j.attempts ELSE j.attempts - 1 END,
        errors = CASE WHEN {_EXPIRED} THEN j.errors || jsonb_build_array(
            CAST(v.error AS jsonb) || jsonb_build_object('at', now())) ELSE j.errors END,
        next_attempt_at = CASE WHEN {_EXPIRED} THEN NULL
            ELSE now() + make_interval(secs => {_DELAY}) END,
        finished_at = CASE WHEN {_EXPIRED} THEN now() END,
        started_at = CASE WHEN {_EXPIRED} THEN j.started_at END,
        worker = NULL, lease_expires_at = NULL
    FROM v WHERE j.id = v.id AND j.attempts = v.attempt AND j.status = 'running'
        AND j.worker = :worker
    RETURNING j.*
), ev AS (
    INSERT INTO job_events (job_id, event, attempt, worker)
    SELECT id, CASE WHEN status = 'dead' THEN 'dead' ELSE 'released' END,
           CASE WHEN status = 'dead' THEN attempts ELSE attempts + 1 END, :worker
    FROM moved
)
SELECT * FROM moved
"""


async def hand_back(
    session: AsyncSession, worker: str, failures: Sequence[Failure], grace_seconds: float
) -> list[JobRow]:
    """running → retrying (not an attempt) within the grace, → dead after it; guarded by
    (attempt, worker) like every outcome. Returns the rows that moved."""
    if not failures:
        return []
    params = {
        "ids": [f.job_id for f in failures],
        "attempts": [f.attempt for f in failures],
        "errors": [json.dumps(f.error) for f in failures],
        "worker": worker,
        "grace": grace_seconds,
        "min_delay": MIN_DELAY_SECONDS,
        "max_delay": MAX_DELAY_SECONDS,
        "fraction": DELAY_FRACTION,
    }
    stmt = select(JobRow).from_statement(text(_HAND_BACK))
    rows = list((await session.scalars(stmt, params)).all())
    for row in rows:
        if row.status == "dead":
            log.warning(
                "unknown job type %r (for %.0fs): the job is dead",
                row.type,
                grace_seconds,
                extra={"job_id": str(row.id)},
            )
        else:
            log.warning(
                "unknown job type %r: handed the job back for other workers (due again at %s)",
                row.type,
                row.next_attempt_at.isoformat() if row.next_attempt_at else "?",
                extra={"job_id": str(row.id)},
            )
    return rows
