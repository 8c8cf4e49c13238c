"""Engine and session factory. One pool per process; nothing is created at import time."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.db.url import engine_statement_args, server_settings
from app.settings import Settings


def create_engine(settings: Settings, *, pre_ping: bool = True) -> AsyncEngine:
    """A pool with a short checkout timeout so overload turns into 503s, not 30 s hangs.

    Without ``pre_ping`` (the API) a checkout costs no round trip; after a Postgres restart
    the first statement on a stale connection fails (a 503) and invalidates the whole pool.
    """
    connect_args: dict[str, object] = {
        "timeout": 5,
        "command_timeout": 30,
        "server_settings": server_settings(settings, "conveyor"),
        **engine_statement_args(settings),  # behind a transaction pooler (ADR 0020)
    }
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args=connect_args,
        hide_parameters=True,  # error messages (which get logged) never carry payloads
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def ping(engine: AsyncEngine) -> None:
    """One round trip to Postgres (``/readyz``); raises when it does not answer."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
