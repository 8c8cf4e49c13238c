"""Repository tests: one transaction per test on the session's migrated database, rolled back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from tests.conftest import Backends


@pytest.fixture(scope="session")
async def engine(backends: Backends) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(backends.database_url, pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that the test never commits and that is rolled back."""
    async with engine.connect() as conn:
        transaction = await conn.begin()
        session = AsyncSession(bind=conn, expire_on_commit=False, autoflush=False)
        try:
            yield session
        finally:
            await session.close()
            await transaction.rollback()
