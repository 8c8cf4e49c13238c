"""The worker: read → claim → run → report → XACK, and its lifecycle.

The read side (:mod:`workers.reader`) fills the worker up to its concurrency; each claimed
job runs in its own task; the reporter (:mod:`workers.reporter`) writes outcomes to Postgres
in batches and then acks the stream entries; the maintenance duties
(:mod:`workers.maintenance`) keep leases, promotion and recovery going. They share one
:class:`~workers.context.WorkerContext`. This module starts them and stops them in order.
"""

from __future__ import annotations

import asyncio
import logging

from app.db.engine import create_engine, create_session_factory
from app.jobs import layout
from app.jobs.dispatch import Dispatcher
from app.jobs.layout import Layout, LayoutMismatch
from app.jobs.registry import load_handlers
from app.jobs.repository import Backoff
from app.jobs.workers_table import NameInUse
from app.observe.exposition import serve_process_metrics
from app.observe.tally import TALLY
from app.settings import Settings
from app.streams.client import StreamClient
from app.streams.connection import create_redis
from app.streams.keys import Keys
from workers import shutdown
from workers.context import RunningSet, WorkerConfig, WorkerContext
from workers.controls import Controls
from workers.maintenance import Maintenance
from workers.progress import ProgressWriter
from workers.reader import READ_BLOCK_MS, Reader
from workers.reporter import Reporter

log = logging.getLogger(__name__)

RETRY_PAUSE = 1.0
LOOP_STOP_SECONDS = 5.0
DB_POOL_SIZE = 8  # hot-path connections: read loops, the reporter, heartbeat, reclaim


class Worker:
    def __init__(self, settings: Settings, config: WorkerConfig) -> None:
        self.name = config.name
        self._engine = create_engine(settings)
        sessions = create_session_factory(self._engine)
        redis = create_redis(settings, block_seconds=READ_BLOCK_MS / 1000)
        stream = StreamClient(redis, Keys(settings.redis_prefix), maxlen=settings.stream_maxlen)
        self.ctx = WorkerContext(
            name=config.name,
            settings=settings,
            config=config,
            sessions=sessions,
            stream=stream,
            dispatcher=Dispatcher(stream, sessions, settings.partitions),
            running=RunningSet(config.concurrency),
            backoff=Backoff(settings.retry_base_seconds, settings.retry_max_seconds),
        )
        self._hurry = asyncio.Event()  # a second stop signal: end the grace period now
        self.reporter = Reporter(self.ctx)
        self.maintenance = Maintenance(self.ctx, self.reporter)
        registry = load_handlers(settings.handler_module_list)
        self.progress = ProgressWriter(self.ctx)
        self.controls = Controls(registry, config.queues)
        self.reader = Reader(
            self.ctx, registry, self.reporter, self.maintenance, self.progress, self.controls
        )

    async def run(self) -> None:
        """Work until :meth:`stop` is called, then drain and hand back what is unfinished."""
        ctx = self.ctx
        log.info(
            "worker %s started: queues=%s concurrency=%d",
            self.name,
            ",".join(ctx.config.queues),
            ctx.config.concurrency,
        )
        await self._until_ready()
        TALLY.start(ctx.stream)
        if ctx.config.metrics_port is not None:
            serve_process_metrics(ctx.config.metrics_port, ctx.settings.worker_metrics_host)
        duties = [
            *self.reader.loops(),
            *self.maintenance.loops(),
            self.progress.run(),
            self._controls_loop(),
        ]
        loops = [asyncio.create_task(c) for c in duties]
        reporter = asyncio.create_task(self.reporter.run())
        # Until the hand-back is done: jobs finishing in the grace period keep their leases,
        # and their time limits (armed as they draw near) still fire.
        leases = [asyncio.create_task(c) for c in self.maintenance.lease_loops()]
        leases.append(asyncio.create_task(self.reader.deadlines.run()))
        await ctx.stopping.wait()
        for task in loops:
            task.cancel()
        _, stuck = await asyncio.wait(loops, timeout=LOOP_STOP_SECONDS)
        if stuck:  # shutdown stays bounded; asyncio.run cancels them again at exit
            log.warning("%d loop(s) ignored cancellation; going on", len(stuck))
        await self.reader.settle()
        await self._drain()
        await self.reporter.stop(reporter)
        await self.reader.hand_back()
        await shutdown.cancel_and_wait(leases)
        await self.maintenance.canceller.close()
        await self.maintenance.unregister()
        await TALLY.stop()
        await ctx.stream.close()
        await ctx.close_db()
        await self._engine.dispose()
        log.info("worker %s stopped", self.name)

    def stop(self) -> None:
        if self.ctx.stopping.is_set():
            log.info("worker %s: second stop signal, handing back now", self.name)
            self._hurry.set()
            return
        log.info("worker %s stopping: no new jobs", self.name)
        self.ctx.stopping.set()

    async def _until_ready(self) -> None:
        ctx = self.ctx
        while not ctx.stopping.is_set():
            try:
                await ctx.open_db(DB_POOL_SIZE)
                await layout.verify(ctx.sessions, Layout.of(ctx.settings))
                await ctx.stream.ensure_groups(ctx.all_streams)
                await self.maintenance.register()
                # Before the first claim: after a switch of Postgres server, claims must hand
                # out tokens above the floor that recording the switch raises (ADR 0012).
                await self.maintenance.redispatch.follow_postgres()
                await self._refresh_controls()  # before the first read: a paused queue waits
                await ctx.stream.warn_unless_noeviction()
                return
            except (NameInUse, LayoutMismatch):
                raise
            except Exception as exc:
                log.warning("waiting for Postgres and Redis: %s", exc)
                await asyncio.sleep(RETRY_PAUSE)

    async def _refresh_controls(self) -> None:
        async with self.ctx.db.acquire() as conn:
            await self.controls.refresh(conn)

    async def _controls_loop(self) -> None:
        """Pauses and limits set over HTTP reach this worker within one poll interval."""
        while not self.ctx.stopping.is_set():
            await asyncio.sleep(self.ctx.settings.promote_interval_seconds)
            try:
                await self._refresh_controls()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last known controls
                log.warning("could not read the flow controls: %s", exc)

    async def _drain(self) -> None:
        """Let in-flight jobs finish for the grace period, then cancel the rest."""
        tasks = [r.task for r in self.ctx.running if r.task is not None]
        if not tasks:
            return
        grace = self.ctx.settings.shutdown_grace_seconds
        log.info("draining %d job(s) for up to %.0fs", len(tasks), grace)
        finished = asyncio.ensure_future(asyncio.wait(tasks))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait([finished, hurry], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        hurry.cancel()
        late = [t for t in tasks if not t.done()]
        stuck = await shutdown.cancel_and_wait(late)  # bounded: a handler may ignore it
        if stuck:
            log.warning("%d job(s) ignored cancellation; handing them back", len(stuck))
