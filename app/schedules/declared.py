"""Schedules declared in code (``@job_type("x", schedule=...)``), synced at worker start.

Each is upserted under the type's name with a hash of its declaration. A row is written only
when the hash differs from the one it holds, so many workers starting at once make one row,
and a restart changes nothing. Precedence: an HTTP edit of a code-declared schedule stays
until the declaration in code changes; then the code's version replaces every field it
declares. ``enabled`` is never written by a sync (a paused schedule stays paused). A schedule
deleted over HTTP comes back at the next worker start while the code still declares it.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.jobs.registry import Registry
from app.schedules import repository
from app.schedules.cron import parse

log = logging.getLogger(__name__)


async def sync_declared(sessions: async_sessionmaker[AsyncSession], registry: Registry) -> int:
    """Write the declared schedules that changed; returns how many rows were written."""
    written = 0
    declared = [t for t in registry.all() if t.schedule is not None]
    async with sessions.begin() as session:
        now = await repository.db_now(session)
        for job_type in declared:
            spec = job_type.schedule
            assert spec is not None
            payload = job_type.validate(spec.payload).model_dump(mode="json")
            values = {
                "name": job_type.name,
                "cron": " ".join(spec.cron.split()),
                "timezone": spec.timezone,
                "type": job_type.name,
                "payload": payload,
                "queue": spec.queue,
                "priority": spec.priority,
                "missed": spec.missed,
                "next_run_at": parse(spec.cron, spec.timezone).next_after(now),
                "declared_hash": spec.digest(job_type.name, payload),
            }
            outcome = await repository.upsert_declared(session, values)
            if outcome is not None:
                written += 1
                log.info("schedule %s %s from its declaration in code", job_type.name, outcome)
        names = {t.name for t in declared}
        for name in sorted(set(await repository.declared_names(session)) - names):
            log.warning(
                "schedule %s was declared in code but no loaded module declares it now;"
                " delete it over HTTP if it is gone for good",
                name,
            )
    log.info(
        "schedules declared in code: %d written, %d unchanged", written, len(declared) - written
    )
    return written
