"""Alerts against a local receiver: one signed POST per crossing, from exactly one of two
checkers running at once (two API processes), again only after the value fell back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.db.engine import create_engine, create_session_factory
from app.devserver import free_port
from app.jobs.status import JobStatus
from app.observe.alerts import Alerts
from app.settings import Settings
from tests.conftest import Backends, make_settings
from tests.jobs.factories import db_now, make_job
from tests.support.http_server import serving

SECRET = "alert-secret"


@dataclass
class Receiver:
    port: int
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def bodies(self, queue: str) -> list[dict[str, Any]]:
        found = [json.loads(body) for _, body in self.posts]
        return [b for b in found if b["queue"] == queue]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())

    async def hook(request: Request) -> Response:
        r.posts.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with serving(app, r.port):
        yield r


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def check_twice_at_once(checkers: list[Alerts]) -> None:
    """Both checkers (two API processes) run a round at the same time; then their POSTs end."""
    await asyncio.gather(*(a.check() for a in checkers))
    for a in checkers:
        await a.stop(None)


async def test_dlq_alert_posts_once_per_crossing(
    backends: Backends, receiver: Receiver, queue: str
) -> None:
    settings = make_settings(
        backends,
        dlq_alert_threshold=2,
        alert_webhook=f"http://127.0.0.1:{receiver.port}/hook",
        http_signing_secret=SECRET,
    )
    async with database(settings) as sessions:
        checkers = [Alerts(sessions, settings), Alerts(sessions, settings)]

        async def dead_job() -> str:
            async with sessions.begin() as session:
                return str((await make_job(session, JobStatus.DEAD, queue=queue)).id)

        first = await dead_job()
        await check_twice_at_once(checkers)
        assert receiver.bodies(queue) == []  # 1 < 2
        await dead_job()
        for _ in range(3):  # crossing once: one POST, however many rounds and checkers
            await check_twice_at_once(checkers)
        [alert] = receiver.bodies(queue)
        assert alert["alert"] == "dlq_depth" and alert["value"] == 2 and alert["threshold"] == 2

        headers, body = next((h, b) for h, b in receiver.posts if json.loads(b)["queue"] == queue)
        verified = Webhook(base64.b64encode(SECRET.encode()).decode()).verify(body, headers)
        assert verified["queue"] == queue
        assert headers["webhook-id"] == headers["conveyor-alert-id"]
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60

        async with sessions.begin() as session:  # one leaves the DLQ: below the threshold
            await session.execute(
                text("UPDATE jobs SET dlq_removed_at = now() WHERE id = :id"), {"id": first}
            )
        await check_twice_at_once(checkers)
        assert len(receiver.bodies(queue)) == 1
        await dead_job()  # crosses again
        await check_twice_at_once(checkers)
        await check_twice_at_once(checkers)
        assert len(receiver.bodies(queue)) == 2


async def test_queue_age_alert_posts_once(
    backends: Backends, receiver: Receiver, queue: str
) -> None:
    settings = make_settings(
        backends,
        queue_age_alert_seconds=60,
        alert_webhook=f"http://127.0.0.1:{receiver.port}/hook",
    )
    async with database(settings) as sessions:
        checkers = [Alerts(sessions, settings), Alerts(sessions, settings)]
        async with sessions.begin() as session:
            now = await db_now(session)
            await make_job(session, JobStatus.QUEUED, queue=queue, enqueued_at=now)
        await check_twice_at_once(checkers)
        assert receiver.bodies(queue) == []
        async with sessions.begin() as session:
            await make_job(
                session, JobStatus.QUEUED, queue=queue, enqueued_at=now - timedelta(seconds=300)
            )
        await check_twice_at_once(checkers)
        await check_twice_at_once(checkers)
        [alert] = receiver.bodies(queue)
        assert alert["alert"] == "queue_age" and alert["value"] >= 300
        assert "webhook-signature" not in receiver.posts[-1][0]  # no secret: unsigned
