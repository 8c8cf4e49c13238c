"""``GET /v1/jobs/{id}`` on asyncpg: one prepared statement, the row rendered once.

The read producers poll is the API's most frequent request. Through the ORM it cost about
1.7 ms of API CPU (py-spy: a quarter in ``Session.get`` and its identity-map bookkeeping,
a fifth in solving the session dependency); here it is a prepared statement on the API's
asyncpg pool (the submit path's) whose JSON columns arrive as text and go into the answer
as they are, through the same ``Job`` model, so both paths give the same document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import asyncpg

from app.db.pool import connection
from app.errors import NotFound
from app.jobs.insertion import JOB_COLUMNS
from app.jobs.principal import Principal

# A stored job: a row of the job's columns, its JSON ones as text (render.stored_job).
Row = Mapping[str, Any]

# JOB_COLUMNS (the submit path's answer) plus what only a stored job has and who may see it
_STORED = f"SELECT {JOB_COLUMNS}, CAST(j.progress AS text) AS progress, j.owner FROM jobs j"
GET_JOB = f"{_STORED} WHERE j.id = $1"
GET_JOBS = f"{_STORED} WHERE j.id = ANY($1::uuid[])"  # the waiters' grouped reads


async def job(
    pool: asyncpg.Pool, acquire_timeout: float, job_id: UUID, principal: Principal
) -> Row:
    """The stored job; 404 when it does not exist or the caller may not see it."""
    async with connection(pool, acquire_timeout) as conn:
        row: Row | None = await conn.fetchrow(GET_JOB, job_id)
    return shown(row, principal)


def shown(row: Row | None, principal: Principal) -> Row:
    """The job, if it exists and the caller may see it; else 404 (the same answer for both)."""
    if row is None or not principal.sees(row["owner"]):
        raise NotFound("job not found")
    return row
