"""The classification of database errors, on errors a real PostgreSQL raised: the same answer
for an error that came through SQLAlchemy's asyncpg dialect and for asyncpg's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.db import errors
from app.embedded import free_port
from tests.conftest import Backends

SETUP = [
    "CREATE TEMP TABLE t_checked (n int CHECK (n > 0))",
    "CREATE TEMP TABLE t_indexed (s text)",
    "CREATE INDEX ON t_indexed (s)",
]
# (id, statement, parameters, expected refusal, SQLSTATE)
CASES: list[tuple[str, str, list[Any], str | None, str]] = [
    ("nan_in_jsonb", "SELECT CAST($1 AS text)::jsonb", ['{"a": NaN}'], "value", "22P02"),
    ("nul_in_jsonb", "SELECT CAST($1 AS text)::jsonb", ['{"a": "\\u0000"}'], "value", "22P05"),
    ("numeric_overflow", "SELECT CAST($1 AS text)::jsonb", ["1" + "0" * 140_000], "value", "22003"),
    ("int_out_of_range", "SELECT CAST($1 AS bigint)::int", [2**40], "value", "22003"),
    # asyncpg refuses these before sending them (its own class-22 DataError, SQLSTATE 22000)
    ("unencodable_text", "SELECT CAST($1 AS text)", ["a\ud800"], "value", "22000"),
    ("int_parameter_out_of_range", "SELECT CAST($1 AS int)", [2**40], "value", "22000"),
    ("check_violation", "INSERT INTO t_checked VALUES ($1)", [0], "value", "23514"),
    (
        "index_row_too_large",
        "INSERT INTO t_indexed SELECT string_agg(md5(random()::text || g), '')"
        " FROM generate_series(1, CAST($1 AS int)) g",
        [400],
        "value",
        "54000",
    ),
    ("undefined_table", "SELECT * FROM no_such_table WHERE 1 = $1", [1], "statement", "42P01"),
    (
        "statement_timeout",
        "SET LOCAL statement_timeout = 50; SELECT pg_sleep($1)",
        [2],
        None,
        "57014",
    ),
]


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def engine(backends: Backends) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(backends.database_url)
    try:
        yield eng
    finally:
        await eng.dispose()


def _raw_sql(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";")]


async def _via_asyncpg(database_url: str, sql: str, params: list[Any]) -> BaseException:
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        for statement in SETUP:
            await conn.execute(statement)
        async with conn.transaction():
            *before, last = _raw_sql(sql)
            for statement in before:
                await conn.execute(statement)
            await conn.fetch(last, *params)
    except Exception as exc:
        return exc
    finally:
        await conn.close()
    raise AssertionError("Postgres accepted it")


async def _via_sqlalchemy(engine: AsyncEngine, sql: str, params: list[Any]) -> BaseException:
    try:
        async with engine.begin() as conn:
            for statement in SETUP:
                await conn.execute(text(statement))
            *before, last = _raw_sql(sql)
            for statement in before:
                await conn.execute(text(statement))
            names = {f"p{i}": value for i, value in enumerate(params, 1)}
            for i in range(len(params), 0, -1):
                last = last.replace(f"${i}", f":p{i}")
            await conn.execute(text(last), names)
    except Exception as exc:
        return exc
    raise AssertionError("Postgres accepted it")


@pytest.mark.parametrize(
    ("sql", "params", "expected", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_refusals_are_classified_by_sqlstate_class(
    backends: Backends,
    engine: AsyncEngine,
    sql: str,
    params: list[Any],
    expected: str | None,
    code: str,
) -> None:
    for exc in (
        await _via_asyncpg(backends.database_url, sql, params),
        await _via_sqlalchemy(engine, sql, params),
    ):
        assert errors.sqlstate(exc) == code, repr(exc)
        assert errors.refusal(exc) == expected, repr(exc)
        assert errors.is_data_error(exc) == (expected is not None)
        assert code in errors.describe(exc)
        assert "NaN" not in errors.describe(exc)  # never the refused value itself


async def test_an_unreachable_server_is_not_a_refusal(backends: Backends) -> None:
    url = make_url(backends.database_url).set(host="127.0.0.1", port=free_port())
    eng = create_async_engine(url, connect_args={"timeout": 2})
    try:
        with pytest.raises(Exception) as via_sqlalchemy:
            async with eng.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await eng.dispose()
    with pytest.raises(Exception) as via_asyncpg:
        await asyncpg.connect(_dsn(url.render_as_string(hide_password=False)), timeout=2)
    for exc in (via_sqlalchemy.value, via_asyncpg.value):
        assert errors.refusal(exc) is None
        assert not errors.is_data_error(exc)
