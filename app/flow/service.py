"""Flow controls over HTTP: pause and resume a queue, set or lift limits.

Each is one upsert of a ``flow_controls`` row; workers read the rows every poll interval
(``workers.controls``). Rows made by workers for token buckets only are never listed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import FlowControlRow
from app.errors import NotFound
from app.flow.limits import NO_LIMITS, Limits
from app.flow.schemas import LimitsOut, Source
from app.jobs.registry import JobType, Registry

log = logging.getLogger(__name__)

_PAUSE = """
INSERT INTO flow_controls (scope, name, paused) VALUES ('queue', :name, :paused)
ON CONFLICT (scope, name) DO UPDATE SET paused = excluded.paused, updated_at = now()
"""
_SET_LIMITS = """
INSERT INTO flow_controls (scope, name, limits_set, concurrency, rate_count, rate_period, burst)
VALUES (:scope, :name, :set, :concurrency, :rate_count, :rate_period, :burst)
ON CONFLICT (scope, name) DO UPDATE SET limits_set = excluded.limits_set,
    concurrency = excluded.concurrency, rate_count = excluded.rate_count,
    rate_period = excluded.rate_period, burst = excluded.burst, updated_at = now()
"""


@dataclass(frozen=True)
class Control:
    """A queue's or type's row as the API shows it."""

    paused: bool
    override: Limits | None  # set over HTTP


def _row_control(row: FlowControlRow) -> Control:
    override = None
    if row.limits_set:
        override = Limits(row.concurrency, row.rate_count, row.rate_period, row.burst)
    return Control(row.paused, override)


async def controls(session: AsyncSession, scope: str) -> dict[str, Control]:
    """The rows of ``scope`` that pause or limit something, by name."""
    rows = await session.scalars(
        select(FlowControlRow).where(
            FlowControlRow.scope == scope, FlowControlRow.paused | FlowControlRow.limits_set
        )
    )
    return {r.name: _row_control(r) for r in rows}


async def set_paused(session: AsyncSession, queue: str, paused: bool) -> None:
    await session.execute(text(_PAUSE), {"name": queue, "paused": paused})
    await session.commit()
    log.info("queue %s %s", queue, "paused" if paused else "resumed")


async def set_limits(session: AsyncSession, scope: str, name: str, limits: Limits | None) -> None:
    """Override (``None``: go back to the declared limits, if any)."""
    values = limits or NO_LIMITS
    params = {
        "scope": scope,
        "name": name,
        "set": limits is not None,
        "concurrency": values.concurrency,
        "rate_count": values.rate_count,
        "rate_period": values.rate_period,
        "burst": values.burst,
    }
    await session.execute(text(_SET_LIMITS), params)
    await session.commit()
    log.info("limits of %s %s set: %s", scope, name, limits)


def job_type(registry: Registry, name: str) -> JobType:
    found = registry.find(name)
    if found is None:
        raise NotFound(f"unknown job type {name!r}", details={"known": sorted(registry.names())})
    return found


def type_limits(job: JobType, control: Control | None) -> LimitsOut:
    if control is not None and control.override is not None:
        return LimitsOut.of(control.override, "api")
    source: Source = "code" if job.limits.any else "none"
    return LimitsOut.of(job.limits, source)


def queue_limits(control: Control | None) -> LimitsOut:
    if control is not None and control.override is not None:
        return LimitsOut.of(control.override, "api")
    return LimitsOut.of(NO_LIMITS, "none")
