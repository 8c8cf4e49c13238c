"""Fixtures for the security tests: API keys, a secured in-process API, and row snapshots."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from app.db.url import asyncpg_dsn
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings


@dataclass(frozen=True)
class Keys:
    producer_a: str
    producer_b: str
    admin: str

    @property
    def spec(self) -> str:
        """``CONVEYOR_API_KEYS``: producer B is given only as a SHA-256 digest."""
        digest = hashlib.sha256(self.producer_b.encode()).hexdigest()
        return f"producer:{self.producer_a},producer:sha256:{digest},admin:{self.admin}"

    def all(self) -> list[str]:
        return [self.producer_a, self.producer_b, self.admin]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def api_key(secret: str) -> dict[str, str]:
    return {"X-API-Key": secret}


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        producer_a=f"pa-{secrets.token_urlsafe(18)}",
        producer_b=f"pb-{secrets.token_urlsafe(18)}",
        admin=f"ad-{secrets.token_urlsafe(18)}",
    )


@pytest.fixture
def secure_settings(backends: Backends, keys: Keys) -> Settings:
    return make_settings(backends, api_keys=keys.spec)


@pytest.fixture
async def secure_client(secure_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process with API keys configured; requests carry no key unless given."""
    app = create_app(secure_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as c:
            yield c


class Database:
    """Direct SQL on the test database, for row counts and fixtures the API cannot build."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def snapshot(self) -> tuple[int, int, str]:
        """Row counts of jobs and job_events, and a digest of every job's mutable state."""
        row = await self.conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_events),
                   (SELECT coalesce(md5(string_agg(
                        concat_ws('|', id, status, attempts, owner, dlq_removed_at, finished_at),
                        ',' ORDER BY id)), '') FROM jobs)
            """
        )
        assert row is not None
        return int(row[0]), int(row[1]), str(row[2])

    async def counts(self) -> tuple[int, int]:
        jobs, events, _ = await self.snapshot()
        return jobs, events

    async def make_dead(self, job_id: str) -> None:
        """Move a waiting job straight to ``dead`` (as if its attempts ran out)."""
        await self.conn.execute(
            "UPDATE jobs SET status = 'dead', attempts = max_attempts, finished_at = now(),"
            ' errors = \'[{"attempt": 1, "error": "boom", "at": "2024-01-01T00:00:00Z"}]\''
            " WHERE id = $1",
            job_id,
        )

    async def status(self, job_id: str) -> str:
        value = await self.conn.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
        return str(value)


@pytest.fixture
async def db(backends: Backends) -> AsyncIterator[Database]:
    conn = await asyncpg.connect(asyncpg_dsn(backends.database_url))
    try:
        yield Database(conn)
    finally:
        await conn.close()
