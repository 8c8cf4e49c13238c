"""Grouped reads of jobs by id, for the requests that wait (``?wait=``, SSE follow).

Waiters come in bursts: a client fires hundreds of ``?wait=`` requests at once, and one
completion batch wakes hundreds of them at the same moment. Each would read its job with a
statement of its own, and a burst of those would queue for the pool's connections (and
time out into 503s). Instead, the reads that arrive while one is in flight wait for it to
end and then share a single ``SELECT … WHERE id = ANY(…)`` (the group commit of
:mod:`app.jobs.intake`, for reads): one statement and one connection per round, however
many requests wait. The statement is :mod:`app.jobs.reading`'s, on the API's asyncpg pool,
and its rows are rendered as they come (no ORM objects).
"""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg

from app.db.pool import connection
from app.jobs.reading import GET_JOBS, Row

MAX_GROUP = 1000


class Lookup:
    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._pending: dict[UUID, list[asyncio.Future[Row | None]]] = {}
        self._running: asyncio.Task[None] | None = None
        self.statements = 0  # rounds run (tests, metrics)

    async def get(self, job_id: UUID) -> Row | None:
        """The job as it is now (read after this call began), or None if there is none."""
        future: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(job_id, []).append(future)
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._rounds())
        return await asyncio.shield(future)

    async def _rounds(self) -> None:
        while self._pending:
            ids = list(self._pending)[:MAX_GROUP]
            waiting = {job_id: self._pending.pop(job_id) for job_id in ids}
            try:
                rows = await self._read(ids)
            except Exception as exc:
                for futures in waiting.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(exc)
                continue
            for job_id, futures in waiting.items():
                for f in futures:
                    if not f.done():
                        f.set_result(rows.get(job_id))

    async def _read(self, ids: list[UUID]) -> dict[UUID, Row]:
        self.statements += 1
        async with connection(self._pool, self._acquire_timeout) as conn:
            return {row["id"]: row for row in await conn.fetch(GET_JOBS, ids)}
