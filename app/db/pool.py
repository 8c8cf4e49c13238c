"""A plain asyncpg pool for the worker's hot path (claim, complete, heartbeat); see ADR 0011.

No ORM, no pre-ping, no reset query on release: a dead connection fails its statement, the
caller retries, and the pool opens a new one when asked.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.engine import make_url

from app.settings import Settings


def asyncpg_dsn(database_url: str) -> str:
    """The ``postgresql://`` form of a ``postgresql+asyncpg://`` URL."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _keep(conn: asyncpg.Connection) -> None:
    """Nothing to reset: hot-path statements change no session state (an open transaction
    is still rolled back by the pool)."""


async def create_pool(settings: Settings, *, max_size: int) -> asyncpg.Pool:
    server_settings = {"application_name": "conveyor-worker"}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url),
        min_size=0,  # no floor to restore while Postgres is down (asyncpg logs each try)
        max_size=max_size,
        timeout=5,
        command_timeout=30,
        reset=_keep,
        server_settings=server_settings,
    )
    return pool
