"""Forms of a database URL: SQLAlchemy's (``postgresql+asyncpg://``) and asyncpg's own."""

from __future__ import annotations

from sqlalchemy.engine import make_url


def asyncpg_dsn(url: str) -> str:
    """The ``postgresql://`` form of a ``postgresql+asyncpg://`` URL, for ``asyncpg.connect``."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)
