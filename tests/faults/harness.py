"""A small Jepsen-style harness: a ledger of submissions, a load generator, faults, a checker.

- :class:`Ledger`: every submission, keyed by its idempotency key, ends ``ok`` (a 2xx with a
  job id), ``fail`` (a definite rejection: a 4xx, or 503 "nothing written" when retries ran
  out) or ``info`` (no definite answer: a timeout, a reset; its outcome is unknown).
- :class:`LoadGenerator`: submits over HTTP at a steady rate; retries ``info`` and 503 with the
  same ``Idempotency-Key`` until a definite answer or its deadline, as a careful producer would.
- :class:`Supervisor`: keeps worker processes alive (restarts the dead), and kills them on demand.
- :class:`Fault`: when a fault hit and whom; the checker measures how long the jobs it touched
  took to make progress again (their next claim or terminal transition).

The checker (drain, figures, gates) is in :mod:`tests.faults.checker`; the set-up every load
scenario shares in :mod:`tests.faults.scenario`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import asyncpg
import httpx

from app.db.url import asyncpg_dsn
from app.jobs.newjob import NewJob
from app.jobs.status import JobStatus
from app.main import create_app
from app.settings import Settings
from tests.support import db
from tests.support.processes import Proc, Spawner

Outcome = Literal["ok", "fail", "info"]
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


async def create_effects_table(database_url: str) -> None:
    """The effects table lives in the test database only (never in the migrations)."""
    await db.execute(database_url, EFFECTS_DDL)


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


def orphan_row(queue: str, key: str) -> NewJob:
    """A job as ``service.submit`` writes it (queued, ``dispatched_at`` NULL)."""
    return NewJob(
        id=uuid.uuid4(),
        type="test.effect",
        queue=queue,
        status=JobStatus.QUEUED,
        priority=0,
        payload_json='{"sleep_ms": 5}',
        max_attempts=20,
        timeout_seconds=None,
        idempotency_key=key,
        idempotency_scope="",
        request_hash=None,
        owner=None,
        run_at=None,
    )


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
        self,
        spawn: Spawner,
        queues: list[str],
        count: int,
        *,
        concurrency: int = 8,
        settings: Settings | None = None,
    ) -> None:
        self.spawn = spawn
        self.queues = queues
        self.concurrency = concurrency
        self.settings = settings  # None: the spawner's
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
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
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
        proc = self.spawn.worker(
            self.queues, concurrency=self.concurrency, name=name, settings=self.settings
        )
        self.procs[name] = proc
        self.history.append(proc)

    async def _watch(self) -> None:
        """Restart workers that died; not those stopped on purpose (SIGTERM: exit code 0),
        so a spawner's teardown is final even if a test failed before :meth:`stop`."""
        while True:
            for name, proc in list(self.procs.items()):
                if not proc.alive() and proc.proc.returncode != 0:
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


async def epoch_recorded(settings: Settings, queue: str) -> None:
    """Wait until a worker's reconcile has recorded the Redis data epoch of ``queue``."""
    sql = "SELECT count(*) > 0 FROM conveyor_state WHERE key LIKE '%' || $1 || '%'"
    await db.wait_for_value(settings.database_url, sql, queue, expected=True, timeout=20.0)


async def served_before(spawn: Spawner, settings: Settings, queue: str) -> None:
    """A worker served the queue (created its groups, recorded its Redis epoch) and stopped,
    so the next start is not a first start (whose reconcile re-sends every queued job)."""
    workers = Supervisor(spawn, [queue], 1, settings=settings)
    workers.start()
    await workers.ready(settings.database_url)
    await epoch_recorded(settings, queue)
    await workers.stop()


async def submit_marked(
    settings: Settings, bodies: Sequence[Mapping[str, object]], *, marked: bool = True
) -> list[uuid.UUID]:
    """Submit through the API (XADD, then the batched confirmation); with ``marked``, check
    that the confirmations were written (the jobs are known to have stream entries)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as http:
            response = await http.post("/v1/jobs/batch", json={"jobs": list(bodies)})
            assert response.status_code == 202, response.text
            ids = [uuid.UUID(j["id"]) for j in response.json()["jobs"]]
    if not marked:
        return ids
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND dispatched_at IS NOT NULL",
            ids,
        )
    finally:
        await conn.close()
    assert count == len(ids), "the API did not confirm its XADDs"
    return ids


async def statuses(settings: Settings, ids: list[uuid.UUID]) -> list[str]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        rows = await conn.fetch("SELECT status FROM jobs WHERE id = ANY($1::uuid[])", ids)
    finally:
        await conn.close()
    return sorted(r["status"] for r in rows)
