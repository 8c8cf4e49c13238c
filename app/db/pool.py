"""Plain asyncpg pools for the two hot paths: the API's submissions (group commit, ADR 0013)
and the worker's claim, complete and heartbeat (ADR 0011). One factory, one name per user.

No ORM, no ping per checkout, no reset query on release: the statements on these paths change
no session state, and an open transaction is still rolled back by the pool. asyncpg notices a
connection the server closed (a restart) and the pool opens a new one on the next acquire; an
error on a connection that dies mid-statement is one of :data:`UNAVAILABLE` (the API answers
503, the worker retries), and the pool replaces that connection when it is released.
Connections are opened lazily (``min_size=0``), so the API starts while Postgres is down and
/readyz reports it, and a worker has no floor to restore while Postgres is down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from app.db.url import (
    asyncpg_dsn,
    pooled_session_sql,
    server_settings,
    session_timeouts,
    statement_cache_args,
)
from app.observe.families import POOL_TIMEOUTS, POOL_WAIT
from app.observe.tally import TALLY
from app.settings import Settings

log = logging.getLogger(__name__)

# Errors that say "Postgres could not be reached or gave up", not "your request is wrong":
# the caller answers 503 with Retry-After. (asyncpg raises OSError subclasses when it cannot
# connect, TimeoutError when the pool or a command times out.) What Postgres refused as a
# value or a statement is told apart by SQLSTATE in app/db/errors.py.
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

API = "conveyor"
WORKER = "conveyor-worker"


@asynccontextmanager
async def connection(
    pool: asyncpg.Pool, acquire_timeout: float
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection whose release never hides what happened on it.

    Releasing resets the connection; on one that broke (a Postgres restart) the reset fails
    and the pool drops the connection. That failure must not replace the statement's own
    result (a committed insert is still committed) or its own error.
    """
    began = time.perf_counter()
    try:
        conn = await pool.acquire(timeout=acquire_timeout)
    except TimeoutError:
        TALLY.count(POOL_TIMEOUTS, ("submit",))
        raise
    TALLY.observe(POOL_WAIT, ("submit",), time.perf_counter() - began)
    try:
        yield conn
    finally:
        try:
            await pool.release(conn)
        except Exception as exc:  # the pool has terminated it; the next acquire opens another
            log.debug("dropped a broken connection: %s", type(exc).__name__)


async def _keep(conn: asyncpg.Connection) -> None:
    """Nothing to reset: hot-path statements change no session state (an open transaction
    is still rolled back by the pool)."""


async def create_pool(
    settings: Settings, *, max_size: int | None = None, application_name: str = API
) -> asyncpg.Pool:
    """A lazily filled pool of at most ``max_size`` connections (default
    ``CONVEYOR_DB_POOL_SIZE``), named ``application_name`` in ``pg_stat_activity``. Behind a
    transaction pooler it keeps no prepared statement past its transaction (ADR 0020)."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url),
        min_size=0,
        max_size=max_size or settings.db_pool_size,
        timeout=5,
        command_timeout=30,
        max_inactive_connection_lifetime=300,
        reset=_keep,
        server_settings=server_settings(settings, application_name),
        **statement_cache_args(settings),
    )
    if settings.db_pooler == "transaction":
        await warn_of_missing_timeouts(pool, settings)
    return pool


async def warn_of_missing_timeouts(pool: asyncpg.Pool, settings: Settings) -> list[str]:
    """Behind a transaction pooler Conveyor cannot send its session timeouts (ADR 0020): log a
    warning naming the statements to run when the server's own defaults are not the same, and
    return the names of the timeouts that differ. Postgres out of reach: nothing to say."""
    wanted = session_timeouts(settings)
    try:
        async with connection(pool, acquire_timeout=5) as conn:
            shown = {
                name: await conn.fetchval("SELECT setting FROM pg_settings WHERE name = $1", name)
                for name in wanted
            }
            role = await conn.fetchval("SELECT current_user")
    except UNAVAILABLE:
        return []
    differ = sorted(name for name, value in wanted.items() if shown[name] != value)
    if differ:
        log.warning(
            "behind a transaction pooler Conveyor cannot set %s on its connections; run: %s",
            ", ".join(differ),
            "; ".join(pooled_session_sql(settings, str(role))),
        )
    return differ
