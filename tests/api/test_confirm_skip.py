"""The API confirms its XADDs in the background; a job that a worker has claimed by then
(named by a job-change message) needs no confirmation, and gets none."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import event

from app.api.deps import AppState
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, wait_until
from tests.support import db
from tests.support.processes import Spawner

JOBS = 40
SLACK = 2  # claims whose message may come before the XADD's reply


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[tuple[AppState, httpx.AsyncClient]]:
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS, timeout=60
        ) as client:
            yield app.state.conveyor, client


async def test_claimed_jobs_are_not_confirmed_and_unclaimed_ones_are(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    idle = f"{queue}-unread"  # no worker reads it: its jobs must still be confirmed
    # The worker's sweep sends again (and marks) a job left unconfirmed for the grace: with
    # the tests' 1 s, a slow host could let it mark a batch the test holds unconfirmed for 3 s.
    patient = settings.model_copy(update={"dispatch_grace_seconds": 60.0})
    spawn.worker([queue], concurrency=JOBS + 8, name="confirm-skip", settings=patient)
    async with api(settings) as (state, client):
        assert state.watch.subscriber is not None
        await asyncio.wait_for(state.watch.subscriber.connected.wait(), 20)

        async def worker_ready() -> bool:
            items = (await client.get("/v1/workers")).json()["items"]
            return any(w["name"] == "confirm-skip" for w in items)

        await wait_until(worker_ready, timeout=60)
        confirmations: list[int] = []

        def count(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
            if "SET dispatched_at = now()" in statement:
                values = params.values() if isinstance(params, dict) else params
                confirmations.append(max(len(v) for v in values if isinstance(v, list)))

        event.listen(state.engine.sync_engine, "before_cursor_execute", count)
        # Time enough for any claim's message to come first, on however slow a machine. (A
        # message that overtakes the XADD's own reply finds nothing to skip: hence the slack.)
        state.dispatcher.confirm_interval = 3.0
        jobs = [{"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(JOBS)]
        response = await client.post("/v1/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 202, response.text
        ids = [j["id"] for j in response.json()["jobs"]]
        done = "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'succeeded'"
        await db.wait_for_value(settings.database_url, done, ids, expected=JOBS, timeout=30.0)

        async def skipped() -> bool:
            return state.dispatcher.skipped >= JOBS - SLACK

        await wait_until(skipped, timeout=10)
        await asyncio.sleep(3.5)  # past the confirmation of whatever was not skipped
        claimed_confirmed = sum(confirmations)
        assert claimed_confirmed + state.dispatcher.skipped == JOBS

        state.dispatcher.confirm_interval = 0.05
        other = await client.post("/v1/jobs", json={"type": "demo.echo", "queue": idle})
        assert other.status_code == 202
        marked = "SELECT dispatched_at IS NOT NULL FROM jobs WHERE id = $1::uuid"
        await db.wait_for_value(
            settings.database_url, marked, other.json()["id"], expected=True, timeout=15.0
        )
        assert sum(confirmations) == claimed_confirmed + 1  # the unread queue's job
    unmarked = "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND dispatched_at IS NULL"
    assert await db.fetchval(settings.database_url, unmarked, ids) == JOBS
