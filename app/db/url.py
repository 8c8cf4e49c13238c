"""Forms of a database URL (SQLAlchemy's ``postgresql+asyncpg://`` and asyncpg's own), and the
session settings every connection carries."""

from __future__ import annotations

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
    transaction timeout (:data:`IDLE_IN_TRANSACTION_FLOOR_SECONDS`)."""
    idle = max(settings.claim_idle_seconds, IDLE_IN_TRANSACTION_FLOOR_SECONDS)
    values = {
        "application_name": application_name,
        "idle_in_transaction_session_timeout": str(int(idle * 1000)),
    }
    if settings.db_statement_timeout_ms:
        values["statement_timeout"] = str(settings.db_statement_timeout_ms)
    return values
