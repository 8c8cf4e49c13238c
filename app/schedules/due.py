"""The due check: every slot of every schedule becomes exactly one job.

Run by every worker's maintenance, for the worker's queues, safely in parallel:

1. one transaction locks the due schedules (``next_run_at <= now()`` on the Postgres clock,
   ``FOR UPDATE SKIP LOCKED``: a schedule another worker holds is left to it);
2. inserts one job per slot with the unique key ``(schedule, scheduled_for)`` (a slot that
   has its job already is skipped, whoever made it) and moves ``next_run_at`` past now;
3. commits, then sends the new jobs to their streams (``Dispatcher.send_committed``). A crash
   between the commit and the send leaves them undispatched: the sweep sends them.

Slots more than ``CONVEYOR_SCHEDULE_GRACE_SECONDS`` late count as missed (nothing was
running): ``skip`` drops them, ``run_once`` makes one job for them, for the first of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import JobRow, ScheduleRow
from app.errors import InvalidInput
from app.jobs.dispatch import Dispatcher
from app.jobs.registry import Registry
from app.jobs.repository import Target
from app.schedules import repository
from app.schedules.cron import parse
from app.schedules.declared import sync_declared
from app.schedules.repository import Advance, NewJob
from app.settings import Settings

log = logging.getLogger(__name__)

DUE_BATCH = 100  # schedules per transaction
MAX_SLOTS = 1000  # slots of one schedule per transaction; the rest in the next one
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class Plan:
    slots: list[datetime]
    next_run_at: datetime


def plan(row: ScheduleRow, now: datetime, grace: timedelta) -> Plan:
    """The slots to make jobs for, and the next slot after them (both on ``now``'s clock)."""
    assert row.next_run_at is not None
    timing = parse(row.cron, row.timezone)
    first = row.next_run_at
    cutoff = now - grace
    slots: list[datetime] = []
    if first < cutoff:  # missed: nothing ran from `first` until `cutoff`
        if row.missed == "run_once":
            slots.append(first)
        first = timing.next_after(cutoff - _TICK)
    upcoming = timing.after(first - _TICK)
    slot = next(upcoming)
    while slot <= now and len(slots) < MAX_SLOTS:
        slots.append(slot)
        slot = next(upcoming)
    return Plan(slots, slot)


def _jobs(row: ScheduleRow, slots: Sequence[datetime]) -> list[NewJob]:
    return [NewJob.of(row, slot, f"schedule:{row.name}") for slot in slots]


async def make_due_jobs(
    session: AsyncSession, queues: Sequence[str], grace: timedelta, limit: int = DUE_BATCH
) -> tuple[int, list[JobRow]]:
    """Lock due schedules, insert their slots' jobs, advance them. The caller commits.

    Returns how many schedules were locked, and the jobs made.
    """
    now, rows = await repository.lock_due(session, queues, limit)
    new: list[NewJob] = []
    moves: list[Advance] = []
    broken: list[str] = []
    for row in rows:
        try:
            p = plan(row, now, grace)
        except InvalidInput as exc:  # e.g. a time zone that the tz database no longer has
            log.error("schedule %s cannot be computed (%s): pausing it", row.name, exc.message)
            broken.append(row.name)
            continue
        new += _jobs(row, p.slots)
        moves.append(Advance(row.name, p.next_run_at, p.slots[-1] if p.slots else None))
    made = await repository.insert_jobs(session, new)
    await repository.advance(session, moves)
    for name in broken:
        await repository.change(session, name, {"enabled": False, "next_run_at": None})
    return len(rows), made


class ScheduleDuty:
    """The maintenance duty: sync the schedules declared in code once, then make due jobs."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: Dispatcher,
        registry: Registry,
        queues: Sequence[str],
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.registry = registry
        self.queues = list(queues)
        self.grace = timedelta(seconds=settings.schedule_grace_seconds)
        self.synced = False

    async def run_schedules(self) -> None:
        if not self.synced:
            try:
                await sync_declared(self.sessions, self.registry)
                self.synced = True
            except Exception as exc:  # try again next time; the due check goes on meanwhile
                log.warning("syncing the schedules declared in code failed: %s", exc)
        while True:
            async with self.sessions.begin() as session:
                locked, made = await make_due_jobs(session, self.queues, self.grace)
            await self.dispatcher.send_committed([Target(j.id, j.queue, j.priority) for j in made])
            for job in made:
                log.info(
                    "job made for schedule %s, slot %s",
                    job.schedule,
                    job.scheduled_for.isoformat() if job.scheduled_for else "-",
                    extra={"job_id": str(job.id), "job_type": job.type},
                )
            if locked < DUE_BATCH:
                return
