"""The worker loop: read → claim → run → report → XACK.

One reader per queue partition fills the worker up to its concurrency; each claimed job runs
in its own task; a single reporter writes outcomes to Postgres in batches (one statement per
batch) and then acks the stream entries. Only this module reports outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import errors as db_errors
from app.db.engine import create_engine, create_session_factory
from app.db.models import JobRow
from app.jobs import queries, repository, unknown_type
from app.jobs.dispatch import Dispatcher
from app.jobs.registry import Registry, load_handlers
from app.jobs.repository import Backoff, Failure, Target
from app.jobs.workers_table import NameInUse
from app.settings import Settings
from app.streams.client import Delivery, StreamClient, create_redis
from app.streams.keys import Keys
from workers import shutdown
from workers.execution import Outcome, execute
from workers.maintenance import Maintenance

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
REPORT_BATCH = 500
REPORT_FLUSH_SECONDS = 10.0  # on shutdown, how long the reporter may take to write what it holds
RETRY_PAUSE = 1.0
STRAY_READ_COUNT = 1000
LOOP_STOP_SECONDS = 5.0


@dataclass
class Running:
    job: JobRow
    delivery: Delivery
    task: asyncio.Task[None] | None = None


@dataclass
class WorkerConfig:
    queues: list[str]
    concurrency: int = 16
    name: str = field(default_factory=lambda: default_name())


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Worker:
    def __init__(self, settings: Settings, config: WorkerConfig) -> None:
        self.settings = settings
        self.config = config
        self.name = config.name
        self.registry: Registry = load_handlers(settings.handler_module_list)
        self.backoff = Backoff(settings.retry_base_seconds, settings.retry_max_seconds)
        self.lease_seconds = settings.claim_idle_seconds
        self.running: dict[UUID, Running] = {}
        self.held: list[Delivery] = []  # read from Redis, not yet claimed in Postgres
        self.outcomes: asyncio.Queue[tuple[Outcome, Delivery]] = asyncio.Queue()
        self.stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: end the grace period now
        self._room = asyncio.Condition()
        self._engine = create_engine(settings)
        self.sessions: async_sessionmaker[AsyncSession] = create_session_factory(self._engine)
        self.keys = Keys(settings.redis_prefix)
        redis = create_redis(settings, block_seconds=READ_BLOCK_MS / 1000)
        self.stream = StreamClient(redis, self.keys, maxlen=settings.stream_maxlen)
        self.dispatcher = Dispatcher(self.stream, self.sessions, settings.partitions)
        self.maintenance = Maintenance(self)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def partitions(self) -> list[tuple[str, int]]:
        return [(q, p) for q in self.config.queues for p in range(self.settings.partitions)]

    @property
    def all_streams(self) -> list[str]:
        return [s for q, p in self.partitions for s in self.keys.partition_streams(q, p)]

    async def run(self) -> None:
        """Work until :meth:`stop` is called, then drain and hand back what is unfinished."""
        log.info(
            "worker %s started: queues=%s concurrency=%d",
            self.name,
            ",".join(self.config.queues),
            self.config.concurrency,
        )
        await self._until_ready()
        loops = [asyncio.create_task(self._read_loop(q, p)) for q, p in self.partitions]
        reporter = asyncio.create_task(self._report_loop())
        loops += [asyncio.create_task(c) for c in self.maintenance.loops()]
        # Until the hand-back is done: jobs finishing in the grace period keep their leases.
        leases = [asyncio.create_task(c) for c in self.maintenance.lease_loops()]
        await self.stopping.wait()
        for task in loops:
            task.cancel()
        _, stuck = await asyncio.wait(loops, timeout=LOOP_STOP_SECONDS)
        if stuck:  # shutdown stays bounded; asyncio.run cancels them again at exit
            log.warning("%d loop(s) ignored cancellation; going on", len(stuck))
        await self._drain()
        await self._stop_reporter(reporter)
        await self._report_pending()
        await self._hand_back()
        await shutdown.cancel_and_wait(leases)
        await self.maintenance.unregister()
        await self.stream.close()
        await self._engine.dispose()
        log.info("worker %s stopped", self.name)

    def stop(self) -> None:
        if self.stopping.is_set():
            log.info("worker %s: second stop signal, handing back now", self.name)
            self._hurry.set()
            return
        log.info("worker %s stopping: no new jobs", self.name)
        self.stopping.set()

    async def _until_ready(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.stream.ensure_groups(self.all_streams)
                await self.maintenance.register()
                return
            except NameInUse:
                raise
            except Exception as exc:
                log.warning("waiting for Postgres and Redis: %s", exc)
                await asyncio.sleep(RETRY_PAUSE)

    async def _drain(self) -> None:
        """Let in-flight jobs finish for the grace period, then cancel the rest."""
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            log.info(
                "draining %d job(s) for up to %.0fs",
                len(tasks),
                self.settings.shutdown_grace_seconds,
            )
            finished = asyncio.ensure_future(asyncio.wait(tasks))
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                [finished, hurry],
                timeout=self.settings.shutdown_grace_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            finished.cancel()
            hurry.cancel()
            late = [t for t in tasks if not t.done()]
            stuck = await shutdown.cancel_and_wait(late)  # bounded: a handler may ignore it
            if stuck:
                log.warning("%d job(s) ignored cancellation; handing them back", len(stuck))

    async def _hand_back(self) -> None:
        """Release unfinished attempts and unclaimed deliveries so others take them at once."""
        unfinished = [
            r
            for r in self.running.values()
            if r.task is None or not r.task.done() or r.task.cancelled()
        ]
        try:
            stray = await self._stray_deliveries()
            async with self.sessions.begin() as session:
                released = await repository.release_many(
                    session, self.name, [(r.job.id, r.job.attempts) for r in unfinished]
                )
                targets = released + await self._orphan_targets(session, stray)
            await self.dispatcher.send_committed(targets)
            await self.stream.ack([r.delivery for r in unfinished] + stray)
            if targets:
                log.info("handed back %d job(s)", len(targets))
        except Exception as exc:  # the lease sweep and XAUTOCLAIM recover them instead
            log.warning("could not hand back jobs on shutdown: %s", exc)

    async def _stray_deliveries(self) -> list[Delivery]:
        """Our pending entries that no running job stands for: the held ones, and those a
        read or claim cut short by shutdown left behind (Redis delivered them to us)."""
        busy = {(r.delivery.stream, r.delivery.entry_id) for r in self.running.values()}
        found: dict[tuple[str, str], Delivery] = {}
        held, self.held = self.held, []
        try:
            for queue, partition in self.partitions:
                streams = self.keys.partition_streams(queue, partition)
                held += await self.stream.read_own(streams, self.name, STRAY_READ_COUNT)
        except Exception as exc:  # still release what we hold; XAUTOCLAIM takes the rest
            log.warning("could not read our pending entries on shutdown: %s", exc)
        for d in held:
            if (d.stream, d.entry_id) not in busy:
                found[(d.stream, d.entry_id)] = d
        return list(found.values())

    async def _orphan_targets(
        self, session: AsyncSession, deliveries: Sequence[Delivery]
    ) -> list[Target]:
        """Jobs of stray deliveries to send again: queued ones, and ones whose claim committed
        for us without a task being started (released; that attempt does not count)."""
        ids = {d.job_id for d in deliveries if d.job_id is not None}
        rows = [r for r in [await queries.get_job(session, i) for i in ids] if r is not None]
        rows = [r for r in rows if r.id not in self.running]  # those are handed back already
        claimed = [
            (r.id, r.attempts) for r in rows if r.status == "running" and r.worker == self.name
        ]
        released = await repository.release_many(session, self.name, claimed)
        queued = [Target(r.id, r.queue, r.priority) for r in rows if r.status == "queued"]
        # Their entries are deleted next; a full stream may refuse the new ones: sweep them.
        await repository.unmark_dispatched(session, [t.id for t in queued])
        return queued + released

    # -- reading and claiming -----------------------------------------------------------------

    async def _wait_for_room(self) -> int:
        async with self._room:
            await self._room.wait_for(lambda: self.free > 0)
            return self.free

    @property
    def free(self) -> int:
        return self.config.concurrency - len(self.running)

    async def _read_loop(self, queue: str, partition: int) -> None:
        streams = self.keys.partition_streams(queue, partition)
        while True:
            try:
                want = await self._wait_for_room()
                batch, self.held = self.held[:want], self.held[want:]
                if len(batch) < want:
                    batch += await self._read_by_band(streams, want - len(batch))
                self.held = batch[want:] + self.held  # a blocking read may return one per band
                await self.start(batch[:want])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("read loop error (%s); retrying", exc)
                await asyncio.sleep(RETRY_PAUSE)

    async def _read_by_band(self, streams: list[str], want: int) -> list[Delivery]:
        """Highest band first; block on all bands only when all are empty."""
        got: list[Delivery] = []
        for stream in streams:
            if len(got) >= want:
                break
            got += await self.stream.read([stream], self.name, want - len(got), None)
        if got:
            return got
        return await self.stream.read(streams, self.name, 1, READ_BLOCK_MS)

    async def start(self, deliveries: list[Delivery]) -> None:
        """Claim the deliveries' jobs in one statement and start those we won."""
        if not deliveries:
            return
        ids = list({d.job_id for d in deliveries if d.job_id is not None})
        try:
            async with self.sessions.begin() as session:
                claimed = await repository.claim_many(session, ids, self.name, self.lease_seconds)
        except Exception:
            self.held.extend(deliveries)  # Postgres is down: keep them and try again
            raise
        won = {row.id: row for row in claimed}
        if won and self.stopping.is_set():
            await self._release_late(list(won.values()), deliveries)
            return
        dropped: list[Delivery] = []
        for d in deliveries:
            row = won.pop(d.job_id, None) if d.job_id is not None else None
            if row is None:
                dropped.append(d)  # taken, cancelled, finished, or a duplicate entry
                continue
            entry = Running(row, d)
            self.running[row.id] = entry
            entry.task = asyncio.create_task(self._run(entry), name=f"job-{row.id}")
        await self.stream.ack(dropped)

    async def _release_late(self, rows: list[JobRow], deliveries: list[Delivery]) -> None:
        """A claim that committed after shutdown began (a loop slow to cancel): hand those
        jobs straight back instead of starting them, so none is left ``running``."""
        async with self.sessions.begin() as session:
            released = await repository.release_many(
                session, self.name, [(r.id, r.attempts) for r in rows]
            )
        await self.dispatcher.send_committed(released)
        await self.stream.ack(deliveries)
        log.info("handed back %d job(s) claimed during shutdown", len(released))

    async def _run(self, entry: Running) -> None:
        outcome = await execute(
            entry.job,
            self.registry,
            self.name,
            default_timeout=self.settings.default_timeout_seconds,
        )
        await self.outcomes.put((outcome, entry.delivery))

    # -- reporting --------------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            batch = [await self.outcomes.get()]
            while not self.outcomes.empty() and len(batch) < REPORT_BATCH:
                batch.append(self.outcomes.get_nowait())
            while True:
                try:
                    await self._report_or_split(batch)
                    for _ in batch:
                        self.outcomes.task_done()
                    break
                except Exception as exc:  # keep the outcomes until Postgres takes them
                    log.warning("reporting %d outcome(s) failed (%s); retrying", len(batch), exc)
                    await asyncio.sleep(RETRY_PAUSE)

    async def _report_or_split(self, batch: list[tuple[Outcome, Delivery]]) -> None:
        """Report a batch; if Postgres refuses its data (not a connection problem), report
        one by one so a single unstorable outcome cannot hold back the others forever."""
        try:
            await self._report(batch)
            return
        except Exception as exc:
            if not db_errors.is_data_error(exc):
                raise
            log.warning(
                "Postgres refused a batch of outcomes (%s); writing one by one",
                db_errors.describe(exc),
            )
        for outcome, delivery in batch:
            try:
                await self._report([(outcome, delivery)])
            except Exception as exc:
                if not db_errors.is_data_error(exc):
                    raise
                error = {
                    "attempt": outcome.attempt,
                    "error": f"outcome could not be stored: {db_errors.describe(exc)}",
                    "type": "OutcomeNotStorable",
                    "traceback": None,
                    "worker": self.name,
                }
                failed = Outcome(outcome.job_id, outcome.attempt, ok=False, error=error)
                await self._report([(failed, delivery)])

    async def _stop_reporter(self, reporter: asyncio.Task[None]) -> None:
        """Let the reporter write every outcome it was given (a batch cut off mid-write would
        leave finished jobs ``running``), then stop it."""
        try:
            await asyncio.wait_for(self.outcomes.join(), timeout=REPORT_FLUSH_SECONDS)
        except TimeoutError:
            log.warning("outcomes not written on shutdown; their leases will lapse")
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)

    async def _report_pending(self) -> None:
        batch = []
        while not self.outcomes.empty():
            batch.append(self.outcomes.get_nowait())
        with contextlib.suppress(Exception):
            await self._report(batch)

    async def _report(self, batch: list[tuple[Outcome, Delivery]]) -> None:
        if not batch:
            return
        wins = [(o.job_id, o.attempt, o.result) for o, _ in batch if o.ok]
        losses = [
            Failure(o.job_id, o.attempt, o.error or {}, o.permanent)
            for o, _ in batch
            if not o.ok and not o.unknown_type
        ]
        unknown = [Failure(o.job_id, o.attempt, o.error or {}) for o, _ in batch if o.unknown_type]
        async with self.sessions.begin() as session:
            done = await repository.succeed_many(session, self.name, wins)
            failed = await repository.fail_many(session, self.name, losses, self.backoff)
            failed += await unknown_type.hand_back(
                session, self.name, unknown, self.settings.unknown_type_grace_seconds
            )
        moved = done | {r.id for r in failed}
        # A fenced-off delivery may belong to whoever reclaimed it now: leave it to its owner
        # (or to XAUTOCLAIM, whose claim then drops it).
        try:
            await self.stream.ack([d for o, d in batch if o.job_id in moved])
        except Exception as exc:  # written already: never redo it; XAUTOCLAIM drops the entries
            log.warning("ack of %d finished entries failed (%s)", len(moved), exc)
        await self.maintenance.dead_lettered([r for r in failed if r.status == "dead"])
        stale = len(batch) - len(moved)
        if stale:
            log.info("%d outcome(s) fenced off: a newer attempt or a cancel won", stale)
        for outcome, _ in batch:
            self.running.pop(outcome.job_id, None)
        async with self._room:
            self._room.notify_all()
