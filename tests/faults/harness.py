"""A small Jepsen-style harness: a ledger of submissions, a load generator, faults, a checker.

- :class:`Ledger`: every submission, keyed by its idempotency key, ends ``ok`` (a 2xx with a
  job id), ``fail`` (a definite rejection: a 4xx, or 503 "nothing written" when retries ran
  out) or ``info`` (no definite answer: a timeout, a reset; its outcome is unknown).
- :class:`LoadGenerator`: submits over HTTP at a steady rate; retries ``info`` and 503 with the
  same ``Idempotency-Key`` until a definite answer or its deadline, as a careful producer would.
- :class:`Supervisor`: keeps worker processes alive (restarts the dead), and kills them on demand.
- :class:`Fault`: when a fault hit and whom; the checker measures how long the jobs it touched
  took to make progress again (their next claim or terminal transition).
- :func:`drain`: with faults stopped, wait (bounded) until no job of the queue is non-terminal.
- :func:`check`: the figures, computed from Postgres (``jobs``, ``job_events``) and from the
  ``fault_effects`` table that the ``test.effect*`` handlers write once per execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import asyncpg
import httpx
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from app.settings import Settings
from app.streams.keys import Keys
from tests.support.processes import Proc, Spawner

Outcome = Literal["ok", "fail", "info"]
TERMINAL = frozenset({"succeeded", "dead", "cancelled"})
PROGRESS = TERMINAL | {"claimed"}
ENDS_ATTEMPT = TERMINAL | {"failed", "reclaimed", "released"}
RETRY_PAUSE = 0.25

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS fault_effects (
    job_id uuid NOT NULL,
    attempt int NOT NULL,
    worker text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fault_effects_job ON fault_effects (job_id);
"""


def dsn(database_url: str) -> str:
    """The asyncpg form of a ``postgresql+asyncpg://`` URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_effects_table(database_url: str) -> None:
    """The effects table lives in the test database only (never in the migrations)."""
    conn = await asyncpg.connect(dsn(database_url))
    try:
        await conn.execute(EFFECTS_DDL)
    finally:
        await conn.close()


def effect_body(queue: str, rng: random.Random, **fields: Any) -> dict[str, Any]:
    """A ``test.effect`` job sleeping 5-60 ms; ``fields`` override the JobCreate fields."""
    body: dict[str, Any] = {
        "type": "test.effect",
        "queue": queue,
        "payload": {"sleep_ms": rng.randint(5, 60)},
        "max_attempts": 20,
    }
    body.update(fields)
    return body


# -- the ledger and the load -------------------------------------------------------------------


@dataclass
class Submission:
    key: str
    invoked: float
    outcome: Outcome = "info"
    job_id: UUID | None = None
    completed: float | None = None
    tries: int = 0
    status: int = 0  # the last HTTP status (0: no answer)


@dataclass
class Ledger:
    submissions: dict[str, Submission] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)  # every HTTP status seen
    errors: Counter[str] = field(default_factory=Counter)  # transport errors, by type
    slowest_answer: float = 0.0  # seconds, over every HTTP try that got an answer
    missing_retry_after: int = 0  # 503 answers without a Retry-After header

    def ok(self) -> dict[UUID, Submission]:
        return {s.job_id: s for s in self.submissions.values() if s.job_id and s.outcome == "ok"}

    def count(self, outcome: Outcome) -> int:
        return sum(1 for s in self.submissions.values() if s.outcome == outcome)

    def record_direct(self, key: str, job_id: UUID, at: float) -> None:
        """A job committed as the API would (it then died before answering)."""
        self.submissions[key] = Submission(key, at, "ok", job_id, at, 1, 202)

    def retried_committed(self) -> int:
        """Submissions whose retry found the job an earlier, unanswered try had committed."""
        return sum(1 for s in self.submissions.values() if s.tries > 1 and s.status == 200)

    @property
    def http_5xx_other(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500 and status != 503)


class LoadGenerator:
    """Submits job bodies over HTTP at ``rate`` per second from ``concurrency`` lanes."""

    def __init__(
        self,
        ledger: Ledger,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        concurrency: int = 8,
        request_timeout: float = 10.0,
        deadline: float = 60.0,
    ) -> None:
        self.ledger = ledger
        self.base_url = base_url  # may change: an API restarted elsewhere
        self.transport = transport
        self.concurrency = concurrency
        self.request_timeout = request_timeout
        self.deadline = deadline
        self.started = 0

    async def submit(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Submission:
        key = uuid.uuid4().hex
        sub = Submission(key, time.time())
        self.ledger.submissions[key] = sub
        give_up = time.monotonic() + self.deadline
        while True:
            sub.tries += 1
            status = await self._try(client, body, sub)
            if sub.outcome != "info":
                return sub
            if time.monotonic() > give_up:
                sub.outcome = "fail" if status == 503 else "info"
                return sub
            await asyncio.sleep(RETRY_PAUSE)

    async def submit_batch(self, bodies: Sequence[dict[str, Any]]) -> None:
        """One ``POST /v1/jobs/batch`` (all committed, then XADDed at once: an instant backlog),
        each item with its own idempotency key; retried whole until a definite answer."""
        subs = [Submission(uuid.uuid4().hex, time.time()) for _ in bodies]
        for sub in subs:
            self.ledger.submissions[sub.key] = sub
        items = [{**b, "idempotency_key": sub.key} for b, sub in zip(bodies, subs, strict=True)]
        give_up = time.monotonic() + self.deadline
        timeout = httpx.Timeout(self.request_timeout)
        async with httpx.AsyncClient(transport=self.transport, timeout=timeout) as client:
            while True:
                for sub in subs:
                    sub.tries += 1
                try:
                    response = await client.post(
                        f"{self.base_url}/v1/jobs/batch", json={"jobs": items}
                    )
                except httpx.HTTPError as exc:
                    self.ledger.errors[type(exc).__name__] += 1
                else:
                    self.ledger.statuses[response.status_code] += 1
                    if response.status_code == 202:
                        for sub, job in zip(subs, response.json()["jobs"], strict=True):
                            sub.outcome, sub.job_id = "ok", UUID(job["id"])
                            sub.completed, sub.status = time.time(), 202
                        return
                if time.monotonic() > give_up:
                    return
                await asyncio.sleep(RETRY_PAUSE)

    async def _try(self, client: httpx.AsyncClient, body: dict[str, Any], sub: Submission) -> int:
        began = time.monotonic()
        try:
            response = await client.post(
                f"{self.base_url}/v1/jobs", json=body, headers={"Idempotency-Key": sub.key}
            )
        except httpx.HTTPError as exc:
            self.ledger.errors[type(exc).__name__] += 1
            return 0
        self.ledger.slowest_answer = max(self.ledger.slowest_answer, time.monotonic() - began)
        self.ledger.statuses[response.status_code] += 1
        sub.status = response.status_code
        if response.status_code == 503 and "retry-after" not in response.headers:
            self.ledger.missing_retry_after += 1
        if response.status_code in (200, 202):
            sub.outcome, sub.job_id = "ok", UUID(response.json()["id"])
            sub.completed = time.time()
        elif 400 <= response.status_code < 500 and response.status_code != 429:
            sub.outcome, sub.completed = "fail", time.time()
        return response.status_code

    async def reached(self, count: float, timeout: float = 120.0) -> None:
        """Wait until ``count`` submissions have started."""
        deadline = time.monotonic() + timeout
        while self.started < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load did not reach {count} submissions")
            await asyncio.sleep(0.05)

    async def run(self, bodies: Sequence[dict[str, Any]], rate: float) -> None:
        start = time.monotonic()
        queue = list(enumerate(bodies))
        queue.reverse()

        async def lane(client: httpx.AsyncClient) -> None:
            while queue:
                index, body = queue.pop()
                self.started += 1
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.submit(client, body)

        timeout = httpx.Timeout(self.request_timeout)
        async with httpx.AsyncClient(transport=self.transport, timeout=timeout) as client:
            await asyncio.gather(*(lane(client) for _ in range(self.concurrency)))


# -- faults and workers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A fault at ``at`` (epoch seconds). It touched: the jobs ``worker`` held then; else the
    given ``jobs``; else every job not yet terminal then."""

    at: float
    kind: str
    worker: str | None = None
    jobs: frozenset[UUID] | None = None


class Supervisor:
    """Keeps ``count`` workers (stable names) running; restarts any that dies within ~0.2 s."""

    def __init__(
        self, spawn: Spawner, queues: list[str], count: int, *, concurrency: int = 8
    ) -> None:
        self.spawn = spawn
        self.queues = queues
        self.concurrency = concurrency
        self.names = [f"{queues[0]}-w{i}" for i in range(count)]
        self.procs: dict[str, Proc] = {}
        self.history: list[Proc] = []
        self.restarts = 0
        self.faults: list[Fault] = []  # kills, and crashes noticed by the supervisor
        self._killed: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for name in self.names:
            self._launch(name)
        self._task = asyncio.create_task(self._watch())

    async def ready(self, database_url: str, timeout: float = 60.0) -> None:
        """Wait until every worker has registered (its row is in ``workers``)."""
        deadline = time.monotonic() + timeout
        conn = await asyncpg.connect(dsn(database_url))
        try:
            while True:
                found = await conn.fetchval(
                    "SELECT count(*) FROM workers WHERE name = ANY($1::text[])", self.names
                )
                if found == len(self.names):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{found}/{len(self.names)} workers ready in {timeout}s")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def _launch(self, name: str) -> None:
        proc = self.spawn.worker(self.queues, concurrency=self.concurrency, name=name)
        self.procs[name] = proc
        self.history.append(proc)

    async def _watch(self) -> None:
        while True:
            for name, proc in list(self.procs.items()):
                if not proc.alive():
                    if proc.pid not in self._killed:
                        self.faults.append(Fault(time.time(), "crash", worker=name))
                    self.restarts += 1
                    self._launch(name)
            await asyncio.sleep(0.2)

    def kill(self, name: str, kind: str = "sigkill") -> None:
        self.faults.append(Fault(time.time(), kind, worker=name))
        self._killed.add(self.procs[name].pid)
        self.procs[name].proc.kill()

    async def kill_randomly(
        self, every: float, rng: random.Random, stop: asyncio.Event, limit: int
    ) -> None:
        """SIGKILL a random worker every ``every`` seconds, until ``stop`` or ``limit`` kills."""
        while len(self.faults) < limit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            self.kill(rng.choice(self.names))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for proc in self.procs.values():
            await asyncio.to_thread(proc.stop, 15)

    def logged(self, pattern: str) -> int:
        """Matches of ``pattern`` in the workers' logs (summing its group, if it has one)."""
        regex = re.compile(pattern)
        return sum(
            int(m.group(1)) if regex.groups else 1
            for proc in self.history
            for m in regex.finditer(proc.output())
        )

    def fenced(self) -> int:
        """Completions the attempt fence rejected, as the workers logged them."""
        return self.logged(r"(\d+) outcome\(s\) fenced off")

    def tracebacks(self) -> int:
        """Unhandled errors the workers printed (a loop that died, a task that crashed)."""
        return self.logged(r"Traceback \(most recent call last\)")


# -- invariants mid-run ---------------------------------------------------------------------------


async def _marked_without_entry(settings: Settings, queue: str) -> set[UUID]:
    conn = await asyncpg.connect(dsn(settings.database_url))
    try:
        rows = await conn.fetch(
            "SELECT id FROM jobs WHERE queue = $1 AND status = 'queued'"
            " AND dispatched_at IS NOT NULL",
            queue,
        )
    finally:
        await conn.close()
    streams = Keys(settings.redis_prefix).queue_streams(queue, settings.partitions)
    async with Redis.from_url(settings.redis_url, decode_responses=True) as redis:
        entries = [e for s in streams for e in await redis.xrange(s, "-", "+") or []]
    present = {(fields or {}).get("job") for _, fields in entries}
    return {r["id"] for r in rows if str(r["id"]) not in present}


async def stranded(settings: Settings, queue: str) -> set[UUID]:
    """Queued jobs marked as dispatched whose stream entry does not exist, seen twice 2 s
    apart: nothing would ever send them again (the sweep skips marked jobs)."""
    first = await _marked_without_entry(settings, queue)
    if not first:
        return first
    await asyncio.sleep(2.0)
    return first & await _marked_without_entry(settings, queue)


# -- drain and check ---------------------------------------------------------------------------


async def open_jobs(database_url: str, queue: str) -> int:
    conn = await asyncpg.connect(dsn(database_url))
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
    conn = await asyncpg.connect(dsn(database_url))
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
