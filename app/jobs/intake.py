"""Group commit of submissions: concurrent single submissions share one INSERT and one
Redis pipeline (decision 0013).

A single submission, validated by its request, joins the pending group and waits for its
answer. Up to ``slots`` groups are in flight at once; a group is everything that arrived
while the previous group's round trips ran (at least everything that arrived in the same
event loop iteration), up to ``max_group`` jobs. So an idle API sends each submission at once,
and a busy one sends a few statements carrying many jobs. Each request still gets its own
answer and its own error: a taken idempotency key is resolved per job (200 or 409); a value
Postgres refuses (SQLSTATE class 22, 23 or 54, see app/db/errors.py) fails the group, which is
then retried job by job so that only the culprit gets its 422; a connection failure answers
every member 503. Then, as before: the commit, then the XADDs, then the answer. A batch (all
or nothing) is its own transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from app.db import errors as db_errors
from app.db.pool import UNAVAILABLE, connection
from app.errors import Conflict, InvalidInput, Unavailable
from app.jobs import insertion
from app.jobs.dispatch import Dispatcher
from app.jobs.insertion import Submitted
from app.jobs.newjob import NewJob
from app.jobs.repository import Target
from app.jobs.status import JobStatus
from app.logs import info_lines
from app.observe.families import SUBMITTED
from app.observe.tally import TALLY

log = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = (
    "a backing service is unavailable; retry later (with the same Idempotency-Key)"
)
UNSTORABLE_MESSAGE = "a value in the request cannot be stored"


@dataclass(slots=True)
class _Waiting:
    job: NewJob
    answer: asyncio.Future[Submitted]


class Intake:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dispatcher: Dispatcher,
        *,
        slots: int = 2,
        max_group: int = 500,
        acquire_timeout: float = 2.0,
    ) -> None:
        self.pool = pool
        self.dispatcher = dispatcher
        self.slots = slots
        self.max_group = max_group
        self.acquire_timeout = acquire_timeout
        self._pending: list[_Waiting] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def submit(self, job: NewJob) -> Submitted:
        """Insert one job with whatever else is pending; its own answer or error."""
        answer: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._pending.append(_Waiting(job, answer))
        if len(self._flushers) < self.slots:
            task = asyncio.create_task(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await answer

    async def submit_batch(self, jobs: Sequence[NewJob]) -> list[Submitted]:
        """All or nothing, in one transaction: any conflict rolls the whole batch back."""
        try:
            async with connection(self.pool, self.acquire_timeout) as conn:
                answers = await self._insert_batch(conn, jobs)
        except UNAVAILABLE as exc:
            log.warning("submission failed: %s", type(exc).__name__)
            raise Unavailable(UNAVAILABLE_MESSAGE) from exc
        except asyncpg.PostgresError as exc:
            if db_errors.refusal(exc) == "value":
                raise InvalidInput(UNSTORABLE_MESSAGE) from exc
            raise  # a refused statement is a 500, anything else a 503 (app/api/errors.py)
        submitted = [a for a in answers if isinstance(a, Submitted)]
        await self._dispatch(submitted)
        return submitted

    async def close(self) -> None:
        """Let the groups in flight finish (their requests are waiting for them)."""
        while self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)

    # -- internals --------------------------------------------------------------------------

    async def _insert_batch(
        self, conn: asyncpg.Connection, jobs: Sequence[NewJob]
    ) -> list[Submitted | Conflict]:
        async with conn.transaction():
            answers = await insertion.insert_resolved(conn, jobs)
            for answer in answers:
                if isinstance(answer, Conflict):
                    raise answer  # rolls the transaction back
        return answers

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # everything submitted in this loop iteration joins the group
        while self._pending:
            group = self._pending[: self.max_group]
            del self._pending[: self.max_group]
            await self._commit(group)

    async def _commit(self, group: list[_Waiting]) -> None:
        jobs = [w.job for w in group]
        answers: Sequence[Submitted | BaseException]
        try:
            answers = await self._insert_group(jobs)
        except UNAVAILABLE as exc:
            log.warning("submission failed: %s (%d jobs)", type(exc).__name__, len(group))
            answers = [Unavailable(UNAVAILABLE_MESSAGE) for _ in group]
        except asyncpg.PostgresError as exc:
            if db_errors.refusal(exc) != "value":  # the statement: 500; the server: 503
                log.warning("submission failed: %s (%d jobs)", db_errors.describe(exc), len(group))
                answers = [exc for _ in group]
            elif len(group) > 1:  # find the culprit: each job on its own
                for waiting in group:
                    await self._commit([waiting])
                return
            else:
                answers = [InvalidInput(UNSTORABLE_MESSAGE)]
        except Exception as exc:
            log.error("submission failed (%d jobs)", len(group), exc_info=exc)
            answers = [exc for _ in group]
        await self._dispatch([a for a in answers if isinstance(a, Submitted)])
        for waiting, answer in zip(group, answers, strict=True):
            if waiting.answer.done():  # the request went away
                continue
            if isinstance(answer, BaseException):
                waiting.answer.set_exception(answer)
            else:
                waiting.answer.set_result(answer)

    async def _insert_group(self, jobs: list[NewJob]) -> list[Submitted | Conflict]:
        """One autocommitted statement; the keys it skipped are looked up after it (and a job
        whose debounce key was freed meanwhile is inserted again)."""
        async with connection(self.pool, self.acquire_timeout) as conn:
            return await insertion.insert_resolved(conn, jobs)

    async def _dispatch(self, answers: Sequence[Submitted]) -> None:
        """XADD the queued jobs made now (scheduled ones are sent when due); never raises."""
        targets = [
            Target(a.new.id, a.new.queue, a.new.priority, a.new.traceparent)
            for a in answers
            if a.created and a.new is not None and a.new.status == JobStatus.QUEUED
        ]
        if targets:
            await self.dispatcher.send_after_commit(targets)
        info = log.isEnabledFor(logging.INFO)  # a line's fields are not built for nothing
        lines: list[tuple[str, dict[str, object]]] = []
        for a in answers:
            if a.created and a.new is not None:
                TALLY.count(SUBMITTED, (a.new.queue, a.new.type))
                if not info:
                    continue
                fields: dict[str, object] = {
                    "event": "submitted",
                    "job_id": str(a.id),
                    "type": a.new.type,
                    "queue": a.new.queue,
                    "status": a.new.status,
                }
                lines.append(("job submitted", fields))
        if lines:
            info_lines(log, lines)
