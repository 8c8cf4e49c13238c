"""``?wait=``: answer with a job as soon as it is terminal, or when the time runs out.

A request that waits holds no connection (so thousands can wait on a pool of ten), and its
reads are grouped with those of the other waiters of the process (:mod:`app.jobs.lookup`).
The wake-ups come from the process's :class:`~app.jobs.watch.Watch`; the waiter is
registered before the first read, so a transition between that read and the wait is not
missed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.jobs import reading, service
from app.jobs.insertion import Submitted
from app.jobs.intake import Intake
from app.jobs.principal import Principal
from app.jobs.reading import Row
from app.jobs.registry import Registry
from app.jobs.schemas import JobCreate
from app.jobs.status import TERMINAL
from app.jobs.watch import Watch

MAX_WAIT_SECONDS = 60.0

Sessions = async_sessionmaker[AsyncSession]


async def _read(watch: Watch, job_id: UUID, principal: Principal) -> Row:
    return reading.shown(await watch.lookup.get(job_id), principal)


async def _until_terminal(watch: Watch, job_id: UUID, principal: Principal, seconds: float) -> Row:
    """Call inside ``watch.waiter(job_id)``: the job now, or once terminal, or at the end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with watch.waiter(job_id) as waiter:
        job = await _read(watch, job_id, principal)
        while job["status"] not in TERMINAL:
            left = deadline - loop.time()
            if left <= 0 or not await waiter.wait(left):
                break
            job = await _read(watch, job_id, principal)
    return job


async def wait_for_job(watch: Watch, job_id: UUID, principal: Principal, seconds: float) -> Row:
    """``GET /v1/jobs/{id}?wait=S``: 404 at once for a job the caller may not see."""
    return await _until_terminal(watch, job_id, principal, seconds)


@dataclass(frozen=True)
class Waited:
    answer: Submitted
    job: Row  # the job as it stands when the wait ended

    @property
    def finished(self) -> bool:
        return self.job["status"] in TERMINAL


async def submit_and_wait(
    intake: Intake,
    registry: Registry,
    watch: Watch,
    item: JobCreate,
    principal: Principal,
    seconds: float,
) -> Waited:
    """``POST /v1/jobs?wait=S``: submit as usual, then wait as ``GET ?wait=S`` does (its first
    read after the commit sees a job that a worker finished before the submit returned)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await service.submit(intake, registry, item, principal)
    left = max(0.0, seconds - (loop.time() - started))
    return Waited(answer, await _until_terminal(watch, answer.id, principal, left))
