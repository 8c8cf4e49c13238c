"""Group commit (decision 0013): concurrent single submissions share statements, and each
request still gets its own answer and its own error."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.api.deps import AppState
from app.db.pool import create_pool
from app.db.url import asyncpg_dsn as dsn
from app.devserver.process import free_port
from app.errors import InvalidInput, Unavailable
from app.jobs.insertion import Submitted
from app.jobs.intake import Intake
from app.jobs.newjob import NewJob
from app.jobs.status import JobStatus
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn(settings.database_url))
    try:
        yield connection
    finally:
        await connection.close()


def _state(app: FastAPI) -> AppState:
    state: AppState = app.state.conveyor
    return state


def _job(queue: str, payload_json: str = '{"n": 1}', key: str | None = None) -> NewJob:
    return NewJob(
        id=uuid.uuid4(),
        type="demo.echo",
        queue=queue,
        status=JobStatus.QUEUED,
        priority=0,
        payload_json=payload_json,
        max_attempts=3,
        timeout_seconds=None,
        idempotency_key=key,
        idempotency_scope="",
        request_hash="h" if key else None,
        owner=None,
        run_at=None,
    )


async def test_concurrent_submissions_share_inserts_and_each_gets_its_own_answer(
    app: FastAPI, queue: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    inserts: list[int] = []
    real_fetch = asyncpg.Connection.fetch

    async def fetch(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if "INSERT INTO jobs" in query:
            inserts.append(len(args[0]))
        return await real_fetch(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch)
    same = {"type": "demo.echo", "queue": queue, "payload": {"same": True}}
    bodies: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        *[
            ("plain", {"type": "demo.echo", "queue": queue, "payload": {"i": i}}, {})
            for i in range(30)
        ],
        *[("repeat", same, {"Idempotency-Key": "k-same"}) for _ in range(5)],
        ("conflict", {**same, "payload": {"a": 1}}, {"Idempotency-Key": "k-both"}),
        ("conflict", {**same, "payload": {"b": 2}}, {"Idempotency-Key": "k-both"}),
        *[
            ("bad", {"type": "demo.sleep", "queue": queue, "payload": {"seconds": -1}}, {})
            for _ in range(3)
        ],
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
    ) as c:
        responses = await asyncio.gather(
            *(c.post("/v1/jobs", json=body, headers=headers) for _, body, headers in bodies)
        )
    by_kind: dict[str, list[httpx.Response]] = {}
    for (kind, _, _), response in zip(bodies, responses, strict=True):
        by_kind.setdefault(kind, []).append(response)
    assert [r.status_code for r in by_kind["plain"]] == [202] * 30
    assert len({r.json()["id"] for r in by_kind["plain"]}) == 30
    assert sorted(r.status_code for r in by_kind["repeat"]) == [200, 200, 200, 200, 202]
    assert len({r.json()["id"] for r in by_kind["repeat"]}) == 1
    assert sorted(r.status_code for r in by_kind["conflict"]) == [202, 409]
    assert [r.status_code for r in by_kind["bad"]] == [422] * 3  # refused before any group
    assert sum(inserts) == 30 + 5 + 2  # the 422s never reached a statement
    assert len(inserts) < 30, f"no group formed: {inserts}"
    count = await conn.fetchval("SELECT count(*) FROM jobs WHERE queue = $1", queue)
    assert count == 30 + 1 + 1


async def test_a_value_postgres_refuses_fails_only_its_own_request(
    app: FastAPI, queue: str, conn: asyncpg.Connection
) -> None:
    """A NUL escape in jsonb is refused by Postgres (class 22): the whole statement fails, so
    the group is retried job by job and only the culprit gets the 422."""
    intake = _state(app).intake
    jobs = [_job(queue) for _ in range(5)]
    jobs.insert(2, _job(queue, payload_json='{"bad": "\\u0000"}'))
    answers = await asyncio.gather(*(intake.submit(j) for j in jobs), return_exceptions=True)
    kinds = Counter(type(a).__name__ for a in answers)
    assert kinds == {"Submitted": 5, "InvalidInput": 1}, answers
    assert isinstance(answers[2], InvalidInput)
    assert all(isinstance(a, Submitted) and a.created for i, a in enumerate(answers) if i != 2)
    count = await conn.fetchval("SELECT count(*) FROM jobs WHERE queue = $1", queue)
    assert count == 5


async def test_a_constraint_postgres_enforces_fails_only_its_own_request(
    app: FastAPI, queue: str, conn: asyncpg.Connection
) -> None:
    """A row that breaks a CHECK constraint (class 23; here ``max_attempts`` 0, which the
    request models never let through) is a refused value too: only its request gets the 422,
    the rest of its group is written."""
    intake = _state(app).intake
    jobs = [_job(queue) for _ in range(4)]
    jobs.insert(1, dataclasses.replace(_job(queue), max_attempts=0))
    answers = await asyncio.gather(*(intake.submit(j) for j in jobs), return_exceptions=True)
    assert isinstance(answers[1], InvalidInput), answers
    assert all(isinstance(a, Submitted) and a.created for i, a in enumerate(answers) if i != 1)
    count = await conn.fetchval("SELECT count(*) FROM jobs WHERE queue = $1", queue)
    assert count == 4


async def test_postgres_unreachable_answers_every_member_503(
    app: FastAPI, settings: Settings, queue: str
) -> None:
    down = settings.model_copy(
        update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x"}
    )
    pool = await create_pool(down)
    intake = Intake(pool, _state(app).dispatcher, acquire_timeout=2.0)
    try:
        answers = await asyncio.gather(
            *(intake.submit(_job(queue)) for _ in range(4)), return_exceptions=True
        )
    finally:
        await pool.close()
    assert [type(a) for a in answers] == [Unavailable] * 4


async def test_a_large_group_keeps_the_insert_and_a_batch_copies(
    app: FastAPI, queue: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of 100 single submissions (autocommitted) is one INSERT; the same 100 jobs as a
    batch (a transaction of its own) are one COPY into each table."""
    inserts: list[int] = []
    copies: list[str] = []
    real_fetch = asyncpg.Connection.fetch
    real_copy = asyncpg.Connection.copy_records_to_table

    async def fetch(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if "INSERT INTO jobs" in query:
            inserts.append(len(args[0]))
        return await real_fetch(self, query, *args, **kwargs)

    async def copy(self: asyncpg.Connection, table: str, **kwargs: Any) -> Any:
        copies.append(table)
        return await real_copy(self, table, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch)
    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", copy)
    intake = _state(app).intake
    group = await asyncio.gather(*(intake.submit(_job(queue)) for _ in range(100)))
    assert all(a.created for a in group)
    assert (inserts, copies) == ([100], [])
    batch = await intake.submit_batch([_job(queue) for _ in range(100)])
    assert [a.created for a in batch] == [True] * 100
    assert (inserts, copies) == ([100], ["jobs", "job_events"])
    count = await conn.fetchval("SELECT count(*) FROM jobs WHERE queue = $1", queue)
    assert count == 200
