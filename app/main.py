"""The HTTP gateway: ``create_app()``; the lifespan opens the engine and Redis."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.api import errors, openapi
from app.api.auth import Authenticator, parse_keys
from app.api.deps import AppState
from app.api.gate import Gate, HostAllowList
from app.api.limits import BodyLimits
from app.api.ratelimit import RateLimiter
from app.api.routes import dlq, flow, jobs, ops, schedules, ui
from app.db.engine import create_engine, create_session_factory
from app.db.pool import create_pool
from app.gcpolicy import settle_gc
from app.jobs import layout, lifecycle
from app.jobs.dispatch import Dispatcher
from app.jobs.intake import Intake
from app.jobs.layout import Layout
from app.jobs.lookup import Lookup
from app.jobs.registry import Registry, load_handlers
from app.jobs.watch import Watch
from app.logs import configure as configure_logging
from app.observe import tracing
from app.observe.alerts import Alerts
from app.observe.http import HttpMetrics
from app.observe.snapshot import Snapshots
from app.observe.tally import TALLY
from app.settings import Settings, get_settings
from app.streams.client import StreamClient
from app.streams.connection import create_redis
from app.streams.keys import Keys
from app.streams.notify import Publisher

log = logging.getLogger(__name__)

DESCRIPTION = """
Submit jobs over HTTP; Conveyor records them in PostgreSQL, delivers them through Redis
Streams to worker processes, retries failures with backoff, and keeps jobs that exhaust
their attempts in a dead-letter queue you can replay.

Each registered job type's payload schema is under `components/schemas/Payload.<type>`,
its result schema (from the handler's return annotation) under
`components/schemas/JobResult.<type>`, and both at `GET /v1/job-types`. The body of
`POST /v1/jobs` (`JobCreate`) is one of `JobCreate.<type>`, discriminated by `type`.
"""


def _lifespan(
    settings: Settings, registry: Registry, auth: Authenticator, server: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # background loops (dispatch confirmations, counters, waits, alerts): untraced
        with tracing.quiet():
            engine = create_engine(settings, pre_ping=False)
            sessions = create_session_factory(engine)
            stream = StreamClient(
                create_redis(settings), Keys(settings.redis_prefix), maxlen=settings.stream_maxlen
            )
            await stream.warn_unless_noeviction()
            layout_check = await layout.guard(sessions, Layout.of(settings))
            dispatcher = Dispatcher(stream, sessions, settings.partitions)
            dispatcher.start()
            pool = await create_pool(settings)
            intake = Intake(pool, dispatcher, acquire_timeout=settings.db_pool_timeout_seconds)
            auth.bind(sessions)
            watch = _watch(settings, sessions, stream, pool)
            watch.listeners.append(dispatcher.changed)
            watch.start()
            snapshots = Snapshots(sessions, stream, settings)
            app.state.conveyor = AppState(
                settings,
                engine,
                sessions,
                stream,
                dispatcher,
                registry,
                auth,
                intake,
                watch,
                snapshots,
            )
            TALLY.start(stream)
            alerts = Alerts(sessions, settings)
            alerting = alerts.start()
        if server:
            settle_gc()
        try:
            yield
        finally:
            with tracing.quiet():  # the last flushes of counters and confirmations
                await watch.stop()
                await layout.stop(layout_check)
                await alerts.stop(alerting)
                await intake.close()
                await TALLY.stop()
                await dispatcher.stop()
                await stream.close()
                await pool.close()
                await engine.dispose()
            tracing.shutdown()

    return lifespan


def _watch(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    stream: StreamClient,
    pool: asyncpg.Pool,
) -> Watch:
    """This process's waiters, its subscription to job changes and its slow re-check."""

    channel = stream.keys.changes
    return Watch(
        sessions,
        Lookup(pool, settings.db_pool_timeout_seconds),
        Publisher(stream.redis, channel),
        settings.redis_url,
        channel,
        settings.wait_recheck_seconds,
        settings.redis_timeout_seconds,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    server = not logging.getLogger().handlers  # a server process (`conveyor api`), not a test
    if server:
        configure_logging(settings.log_level, settings.log_format or "json")
        tracing.setup("conveyor-api")  # off unless the OTEL_* variables ask for it
    registry = load_handlers(settings.handler_module_list)
    lifecycle.install(settings, registry)
    auth = Authenticator(parse_keys(settings.api_keys))
    lifespan = _lifespan(settings, registry, auth, server)
    app = FastAPI(
        title="Conveyor",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(dlq.router)
    app.include_router(ops.router)
    app.include_router(schedules.router)
    app.include_router(flow.router)
    app.include_router(ops.public)
    app.include_router(ui.pages)
    app.include_router(ui.parts)
    app.mount("/ui/static", StaticFiles(directory=ui.STATIC), name="ui-static")
    app.add_middleware(BodyLimits, max_bytes=settings.max_payload_bytes)
    app.add_middleware(  # outermost: 400/401/415/422/429 before any body is read
        Gate,
        auth=auth,
        hosts=HostAllowList(settings.allowed_hosts),
        limiter=RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
        stream=lambda: app.state.conveyor.stream,
    )
    app.add_middleware(HttpMetrics, templates=lambda: app.openapi().get("paths", {}))  # outermost
    app.openapi = lambda: openapi.build(app, registry, auth.enabled)  # type: ignore[method-assign]
    tracing.instrument_api(app)  # when tracing is on: the request's span is outermost
    return app
