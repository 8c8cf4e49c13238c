"""The checker: what Postgres (and the streams) say after, or during, a fault scenario.

- :func:`drain`: with faults stopped, wait (bounded) until no job of the queue is non-terminal.
- :func:`check`: the figures, computed from ``jobs``, ``job_events`` and the ``fault_effects``
  table that the ``test.effect*`` handlers write once per execution: ``lost``,
  ``dup_terminal``, ``dup_submit``, ``unexpected`` (all must be 0), ``dup_exec``, recovery
  delays, throughput.
- :func:`conclude`: drain, check, stop the workers, print the scenario's line, assert the gates.
- :func:`stranded`: an invariant to check mid-run: no queued job is marked dispatched while
  its stream entry is missing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from redis.asyncio import Redis

from app.db.url import asyncpg_dsn
from app.settings import Settings
from app.streams.keys import Keys
from tests.faults.harness import Fault, Ledger, Supervisor

TERMINAL = frozenset({"succeeded", "dead", "cancelled"})
PROGRESS = TERMINAL | {"claimed"}
ENDS_ATTEMPT = TERMINAL | {"failed", "deferred", "reclaimed", "released"}


# -- invariants mid-run ---------------------------------------------------------------------------


async def _marked_without_entry(settings: Settings, queue: str) -> set[tuple[UUID, Any]]:
    """(job, its mark) of queued jobs marked as dispatched with no entry in their streams."""
    streams = Keys(settings.redis_prefix).queue_streams(queue, settings.partitions)
    async with Redis.from_url(settings.redis_url, decode_responses=True) as redis:
        before = [e for s in streams for e in await redis.xrange(s, "-", "+") or []]
        conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
        try:
            rows = await conn.fetch(
                "SELECT id, dispatched_at FROM jobs WHERE queue = $1 AND status = 'queued'"
                " AND dispatched_at IS NOT NULL",
                queue,
            )
        finally:
            await conn.close()
        after = [e for s in streams for e in await redis.xrange(s, "-", "+") or []]
    present = {(fields or {}).get("job") for _, fields in before + after}
    return {(r["id"], r["dispatched_at"]) for r in rows if str(r["id"]) not in present}


async def stranded(settings: Settings, queue: str) -> dict[UUID, list[str]]:
    """Queued jobs marked as dispatched, with the same mark 2 s apart, whose stream entry is
    missing both times: nothing would ever send them again (the sweep skips marked jobs).
    Returns each one's history (``event@attempt``) for the assertion message."""
    first = await _marked_without_entry(settings, queue)
    if first:
        await asyncio.sleep(2.0)
        first &= await _marked_without_entry(settings, queue)
    if not first:
        return {}
    snap = await snapshot(settings.database_url, queue)
    return {
        job_id: [f"{e.event}@{e.attempt}" for e in snap.history.get(job_id, [])]
        for job_id, _ in first
    }


# -- drain and check ---------------------------------------------------------------------------


async def open_jobs(database_url: str, queue: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE queue = $1"
            " AND status NOT IN ('succeeded', 'dead', 'cancelled')",
            queue,
        )
        return count
    finally:
        await conn.close()


async def drain(database_url: str, queue: str, timeout: float = 90.0) -> float:
    """Wait until no job of ``queue`` is non-terminal (or the timeout); returns the seconds."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if await open_jobs(database_url, queue) == 0:
                break
        except (OSError, asyncpg.PostgresError):
            pass  # the database may still be coming back
        await asyncio.sleep(0.25)
    return time.monotonic() - began


@dataclass(frozen=True)
class Event:
    event: str
    attempt: int
    worker: str | None
    at: float


@dataclass
class Report:
    scenario: str
    jobs: int
    lost: list[UUID]
    dup_terminal: list[UUID]
    dup_submit: list[str]
    unexpected: list[UUID]
    dup_exec: int
    recovery: list[float]
    throughput: float
    statuses: dict[str, int]
    snap: Snapshot
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recovery_p99(self) -> float:
        return percentile(self.recovery, 0.99)

    def line(self) -> str:
        head = (
            f"{self.scenario} lost={len(self.lost)} dup_terminal={len(self.dup_terminal)}"
            f" dup_submit={len(self.dup_submit)} unexpected={len(self.unexpected)}"
            f" dup_exec={self.dup_exec} recovery_p99_s={self.recovery_p99:.2f} jobs={self.jobs}"
        )
        tail = {
            "recovery_max_s": f"{max(self.recovery, default=0.0):.2f}",
            "affected": len(self.recovery),
            "throughput_jobs_s": f"{self.throughput:.0f}",
            **self.extra,
        }
        return head + "".join(f" {k}={v}" for k, v in tail.items())

    def assert_clean(self) -> None:
        assert not self.lost, f"{self.scenario}: lost jobs {self.lost[:10]} ({self.statuses})"
        assert not self.dup_terminal, (
            f"{self.scenario}: >1 terminal event: {self.dup_terminal[:10]}"
        )
        assert not self.dup_submit, f"{self.scenario}: >1 job for a key: {self.dup_submit[:10]}"
        assert not self.unexpected, (
            f"{self.scenario}: effects of unknown jobs {self.unexpected[:10]}"
        )


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Snapshot:
    """What Postgres holds about one queue, read once after the drain."""

    jobs: dict[UUID, asyncpg.Record]
    history: dict[UUID, list[Event]]
    effects: list[asyncpg.Record]


async def snapshot(database_url: str, queue: str) -> Snapshot:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        jobs = await conn.fetch(
            "SELECT id, status, type, attempts, max_attempts, idempotency_key FROM jobs"
            " WHERE queue = $1",
            queue,
        )
        events = await conn.fetch(
            "SELECT e.job_id, e.event, e.attempt, e.worker, extract(epoch FROM e.at) AS at"
            " FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.queue = $1"
            " ORDER BY e.id",
            queue,
        )
        effects = await conn.fetch(
            "SELECT f.job_id, f.attempt, f.worker FROM fault_effects f"
            " LEFT JOIN jobs j ON j.id = f.job_id WHERE j.id IS NULL OR j.queue = $1",
            queue,
        )
    finally:
        await conn.close()
    history: dict[UUID, list[Event]] = defaultdict(list)
    for e in events:
        history[e["job_id"]].append(Event(e["event"], e["attempt"], e["worker"], float(e["at"])))
    return Snapshot({r["id"]: r for r in jobs}, dict(history), list(effects))


def duplicate_terminals(history: dict[UUID, list[Event]]) -> list[UUID]:
    """Jobs with more than one terminal event in one attempt series (between replays)."""
    bad: list[UUID] = []
    for job_id, events in history.items():
        seen = 0
        for e in events:
            if e.event == "replayed":
                seen = 0
            elif e.event in TERMINAL:
                seen += 1
                if seen == 2:
                    bad.append(job_id)
    return bad


def _holder_at(events: list[Event], at: float) -> str | None:
    holder: str | None = None
    for e in events:
        if e.at > at:
            break
        if e.event == "claimed":
            holder = e.worker
        elif e.event in ENDS_ATTEMPT:
            holder = None
    return holder


def _touched(fault: Fault, job_id: UUID, events: list[Event]) -> bool:
    if fault.jobs is not None:
        return job_id in fault.jobs
    if fault.worker is not None:
        return _holder_at(events, fault.at) == fault.worker
    began = events[0].at <= fault.at
    return began and not any(e.event in TERMINAL and e.at <= fault.at for e in events)


def recovery_delays(history: dict[UUID, list[Event]], faults: Sequence[Fault]) -> list[float]:
    """Per fault and touched job: seconds from the fault to the job's next claim or end."""
    delays: list[float] = []
    for fault in faults:
        for job_id, events in history.items():
            if not events or not _touched(fault, job_id, events):
                continue
            after = [e.at for e in events if e.at > fault.at and e.event in PROGRESS]
            if after:
                delays.append(min(after) - fault.at)
    return delays


def queue_waits(history: dict[UUID, list[Event]]) -> list[float]:
    """Per job: seconds from its first event (submitted) to its first claim."""
    waits: list[float] = []
    for events in history.values():
        claims = [e.at for e in events if e.event == "claimed"]
        if events and claims:
            waits.append(claims[0] - events[0].at)
    return waits


def _throughput(history: dict[UUID, list[Event]]) -> float:
    starts = [events[0].at for events in history.values() if events]
    ends = [e.at for events in history.values() for e in events if e.event in TERMINAL]
    if not starts or not ends or max(ends) <= min(starts):
        return 0.0
    return len(ends) / (max(ends) - min(starts))


async def check(
    scenario: str,
    database_url: str,
    queue: str,
    ledger: Ledger,
    faults: Sequence[Fault] = (),
    *,
    breakdown: dict[str, Sequence[Fault]] | None = None,
    **extra: Any,
) -> Report:
    """The figures; ``breakdown`` adds a ``<name>_p99_s`` recovery figure per group of faults."""
    snap = await snapshot(database_url, queue)
    for name, group in (breakdown or {}).items():
        extra[f"{name}_p99_s"] = f"{percentile(recovery_delays(snap.history, group), 0.99):.2f}"
    accepted = ledger.ok()
    lost = [i for i in accepted if i not in snap.jobs or snap.jobs[i]["status"] not in TERMINAL]
    keys = Counter(r["idempotency_key"] for r in snap.jobs.values() if r["idempotency_key"])
    unknown = {k for k, s in ledger.submissions.items() if s.outcome == "info"}
    recovered = {i for i, r in snap.jobs.items() if r["idempotency_key"] in unknown}
    executed = [r["job_id"] for r in snap.effects]
    return Report(
        scenario=scenario,
        jobs=len(accepted),
        lost=lost,
        dup_terminal=duplicate_terminals(snap.history),
        dup_submit=[k for k, n in keys.items() if n > 1],
        unexpected=sorted({i for i in executed if i not in accepted and i not in recovered}),
        dup_exec=len(executed) - len(set(executed)),
        recovery=recovery_delays(snap.history, faults),
        throughput=_throughput(snap.history),
        statuses=dict(Counter(r["status"] for r in snap.jobs.values())),
        snap=snap,
        extra={
            "wait_p50_s": f"{percentile(queue_waits(snap.history), 0.5):.2f}",
            "info": ledger.count("info"),
            "recovered": len(recovered),
            "fail": ledger.count("fail"),
            "http_503": ledger.statuses.get(503, 0),
            "http_5xx_other": ledger.http_5xx_other,
            "retried_committed": ledger.retried_committed(),
            **extra,
        },
    )


async def conclude(
    scenario: str,
    database_url: str,
    queue: str,
    ledger: Ledger,
    workers: Supervisor,
    results: Path,
    faults: Sequence[Fault] = (),
    *,
    breakdown: dict[str, Sequence[Fault]] | None = None,
    **extra: Any,
) -> Report:
    """Faults are over: drain, check, stop the workers, print the line, assert the gates
    (lost, dup_terminal, dup_submit, unexpected all 0; no worker printed a traceback)."""
    drained = await drain(database_url, queue)
    report = await check(
        scenario, database_url, queue, ledger, faults, breakdown=breakdown, **extra
    )
    await workers.stop()
    report.extra.update(
        restarts=workers.restarts,
        fenced=workers.fenced(),
        worker_tracebacks=workers.tracebacks(),
        drain_s=f"{drained:.1f}",
    )
    publish(report, results)
    report.assert_clean()
    assert report.extra["worker_tracebacks"] == 0, "a worker printed an unhandled error"
    return report


def publish(report: Report, results: Path) -> None:
    """Print the scenario's line (visible with ``-s``) and append it to ``results``."""
    line = report.line()
    print(f"\n{line}")
    with results.open("a") as out:
        out.write(line + "\n")
