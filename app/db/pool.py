"""A pool of raw asyncpg connections for the submit path, and what its errors mean.

No ping per checkout: asyncpg notices a connection the server closed (a restart) and the pool
opens a new one on the next acquire; an error on a connection that dies mid-statement is
answered 503 (:data:`UNAVAILABLE`), and the pool replaces that connection when it is released.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.engine import make_url

from app.settings import Settings

log = logging.getLogger(__name__)

# Errors that say "Postgres could not be reached or gave up", not "your request is wrong":
# the caller answers 503 with Retry-After. (asyncpg raises OSError subclasses when it cannot
# connect, TimeoutError when the pool or a command times out.)
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # connection closed or broken under us
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.OperatorInterventionError,  # class 57: shutdown, starting up, statement timeout
    asyncpg.TransactionRollbackError,  # class 40: serialization failure, deadlock
    asyncpg.InternalClientError,  # a connection left mid-protocol by one that broke
)


@asynccontextmanager
async def connection(
    pool: asyncpg.Pool, acquire_timeout: float
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection whose release never hides what happened on it.

    Releasing resets the connection; on one that broke (a Postgres restart) the reset fails
    and the pool drops the connection. That failure must not replace the statement's own
    result (a committed insert is still committed) or its own error.
    """
    conn = await pool.acquire(timeout=acquire_timeout)
    try:
        yield conn
    finally:
        try:
            await pool.release(conn)
        except Exception as exc:  # the pool has terminated it; the next acquire opens another
            log.debug("dropped a broken connection: %s", type(exc).__name__)


def dsn(database_url: str) -> str:
    """The libpq form of a ``postgresql+asyncpg://`` URL."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def create_pool(settings: Settings, *, max_size: int | None = None) -> asyncpg.Pool:
    """Connections are opened lazily (``min_size=0``), so the API starts while Postgres is
    down and /readyz reports it."""
    server_settings = {"application_name": "conveyor"}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn(settings.database_url),
        min_size=0,
        max_size=max_size or settings.db_pool_size,
        timeout=5,
        command_timeout=30,
        max_inactive_connection_lifetime=300,
        server_settings=server_settings,
    )
    return pool
