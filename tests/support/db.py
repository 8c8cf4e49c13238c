"""One-shot SQL on a fresh asyncpg connection (the server may have restarted in between).

``url`` is a SQLAlchemy URL (``postgresql+asyncpg://``), as in the settings.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from app.db.url import asyncpg_dsn, with_database


async def execute(url: str, sql: str, *args: Any) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def wait_for_value(
    url: str, sql: str, *args: Any, expected: Any, timeout: float = 30.0
) -> None:
    """Poll ``sql`` (one value) on one connection until it equals ``expected``."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while (value := await conn.fetchval(sql, *args)) != expected:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{sql!r} gave {value!r}, not {expected!r}, in {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


@contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """An empty database of its own on the server of ``server_url`` (its URL), dropped after.
    Synchronous, for fixtures outside the event loop."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(execute(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server_url, name)
    finally:
        asyncio.run(execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def login_over_tcp(port: int, password: str | None) -> object:
    """Log in to a local server's ``conveyor`` database as ``postgres``; the current user."""
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", password=password, database="conveyor"
    )
    try:
        return await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
