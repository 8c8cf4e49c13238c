"""Forms of a database URL (SQLAlchemy's ``postgresql+asyncpg://`` and asyncpg's own), the
session settings every connection carries, and what a transaction pooler cannot carry
(ADR 0020)."""

from __future__ import annotations

from uuid import uuid4

from sqlalchemy.engine import make_url

from app.settings import Settings


def asyncpg_dsn(url: str) -> str:
    """The ``postgresql://`` form of a ``postgresql+asyncpg://`` URL, for ``asyncpg.connect``."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


# A session left idle inside a transaction for this long is ended by Postgres, which releases
# its row locks. It bounds how long a frozen or cut-off process (SIGSTOP, a VM pause, a hung
# event loop) can block others: a successor taking over its worker name, or a worker claiming
# the rows it had locked. Never shorter than the lease, so a slow but live process is not cut.
IDLE_IN_TRANSACTION_FLOOR_SECONDS = 5.0


def server_settings(settings: Settings, application_name: str) -> dict[str, str]:
    """The session settings of every Conveyor connection (the ORM engine and the asyncpg
    pools): its name in ``pg_stat_activity``, the statement timeout, and the idle-in-
    transaction timeout (:data:`IDLE_IN_TRANSACTION_FLOOR_SECONDS`).

    Behind a transaction pooler (``CONVEYOR_DB_POOLER=transaction``) only the name is sent:
    PgBouncer tracks ``application_name`` per client, but refuses any other startup parameter
    (or, listed in ``ignore_startup_parameters``, drops it without a word). The operator sets
    the two timeouts on the role or database instead (:func:`pooled_session_sql`)."""
    if settings.db_pooler == "transaction":
        return {"application_name": application_name}
    return {"application_name": application_name, **session_timeouts(settings)}


def session_timeouts(settings: Settings) -> dict[str, str]:
    """The two timeouts of :func:`server_settings` (milliseconds), whatever the pooler."""
    idle = max(settings.claim_idle_seconds, IDLE_IN_TRANSACTION_FLOOR_SECONDS)
    values = {"idle_in_transaction_session_timeout": str(int(idle * 1000))}
    if settings.db_statement_timeout_ms:
        values["statement_timeout"] = str(settings.db_statement_timeout_ms)
    return values


def pooled_session_sql(settings: Settings, role: str) -> list[str]:
    """What an operator runs once behind a transaction pooler, where Conveyor cannot send its
    session settings: the same timeouts as role defaults, which every server connection the
    pooler opens for ``role`` starts with."""
    return [
        f'ALTER ROLE "{role}" SET {name} = {value}'
        for name, value in session_timeouts(settings).items()
    ]


def statement_cache_args(settings: Settings) -> dict[str, object]:
    """asyncpg ``connect`` arguments for the statement cache: none behind a pooler that cannot
    keep a prepared statement past the transaction (``CONVEYOR_DB_STATEMENT_CACHE``)."""
    if settings.db_statement_cache_enabled:
        return {}
    return {"statement_cache_size": 0}


def engine_statement_args(settings: Settings) -> dict[str, object]:
    """The SQLAlchemy asyncpg dialect's arguments for the same. The dialect prepares every
    statement by name, inside the transaction it runs in; with no cache, each name is unique,
    so a server connection that another client left a statement on never sees a clash."""
    if settings.db_statement_cache_enabled:
        return {}
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": _unique_statement_name,
    }


def _unique_statement_name() -> str:
    return f"__conveyor_{uuid4().hex}__"
