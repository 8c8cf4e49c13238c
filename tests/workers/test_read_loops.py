"""Many read loops in one worker share its held deliveries; none may be dropped.

A worker reads each (queue, partition) in a loop of its own, and an idle loop waits in a
blocking XREADGROUP. What such a read returns joins the worker's held deliveries, which the
other loops take from meanwhile. An entry delivered by Redis but dropped from that list stays
pending on the worker, unstarted, until XAUTOCLAIM finds it idle (``claim_idle_seconds``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import httpx
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from app.settings import Settings
from app.streams.keys import Keys
from app.streams.notify import decode
from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Spawner

IDLE_QUEUES = 11
JOBS = 150
RATE = 40.0  # jobs/s: every one arrives while the idle loops are in their blocking reads


async def test_a_trickle_beside_idle_read_loops_starts_every_job_at_once(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """One busy queue and eleven idle ones: every job starts within seconds. With the lease
    (and so XAUTOCLAIM's idle time) at 60 s, a dropped delivery would wait a minute."""
    queues = [queue, *(f"{queue}-idle{i}" for i in range(IDLE_QUEUES))]
    patient = settings.model_copy(update={"claim_idle_seconds": 60.0})
    spawn.worker(queues, concurrency=64, name=f"loops-{queue}", settings=patient)
    first = await submit(client, {"type": "demo.echo", "queue": queue, "payload": {"n": -1}})
    await wait_for_status(client, str(first["id"]), {"succeeded"}, timeout=30)  # reading
    ids = []
    for n in range(JOBS):
        body = {"type": "demo.echo", "queue": queue, "payload": {"n": n}}
        ids.append(str((await submit(client, body))["id"]))
        await asyncio.sleep(1 / RATE)
    statuses: dict[str, str] = {}

    async def all_finished() -> bool:
        for job_id in ids:
            if statuses.get(job_id) != "succeeded":
                statuses[job_id] = (await client.get(f"/v1/jobs/{job_id}")).json()["status"]
        return all(s == "succeeded" for s in statuses.values())

    try:
        await wait_until(all_finished, timeout=15, interval=0.5)
    except AssertionError:
        waiting = {i: s for i, s in statuses.items() if s != "succeeded"}
        raise AssertionError(f"{len(waiting)} of {JOBS} jobs not run in 15 s: {waiting}") from None


LONE_JOBS = 8
BACKLOG = 40


@asynccontextmanager
async def counted_reads(redis: Redis, queue: str) -> AsyncIterator[dict[str, int]]:
    """XREADGROUP calls on ``queue``'s streams while the block runs, seen with MONITOR:
    ``blocking`` ones and non-blocking ``band`` ones."""
    mine = f"{{{queue}:".upper()
    reads = {"blocking": 0, "band": 0}
    async with redis.monitor() as monitor:
        watching = asyncio.Event()

        async def count() -> None:
            watching.set()
            async for command in monitor.listen():
                text = str(command.get("command", "")).upper()
                if text.startswith("XREADGROUP") and mine in text and " >" in text:
                    reads["blocking" if " BLOCK " in text else "band"] += 1

        counting = asyncio.create_task(count())
        await watching.wait()
        await asyncio.sleep(0.2)
        try:
            yield reads
        finally:
            await asyncio.sleep(0.1)
            counting.cancel()


async def test_a_lone_job_on_a_quiet_queue_costs_one_read(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, redis: Redis
) -> None:
    """Jobs that arrive one at a time are each read by the blocking XREADGROUP alone: the
    non-blocking read of each band (three round trips per job) is skipped while the queue is
    quiet."""
    spawn.worker([queue], concurrency=16, name=f"quiet-{queue}")
    first = await submit(client, {"type": "demo.echo", "queue": queue, "payload": {"n": -1}})
    await wait_for_status(client, str(first["id"]), {"succeeded"}, timeout=30)
    async with counted_reads(redis, queue) as reads:
        for n in range(LONE_JOBS):
            body = {"type": "demo.echo", "queue": queue, "payload": {"n": n}}
            job = await submit(client, body)
            await wait_for_status(client, str(job["id"]), {"succeeded"}, timeout=15)
    # Before: three band reads per job (24); now none while the queue stays quiet.
    assert reads["blocking"] >= LONE_JOBS, reads
    assert reads["band"] <= 2, reads


async def test_a_worker_short_of_room_keeps_reading_by_band(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, redis: Redis
) -> None:
    """A backlog on a worker whose attempts end one by one: each turn starts as many jobs as
    it has room for, which is one or two, yet the queue is not quiet, so the band reads stay
    (and with them the highest band first, and bigger claims as room grows)."""
    spawn.worker([queue], concurrency=2, name=f"busy-{queue}")
    first = await submit(client, {"type": "demo.echo", "queue": queue, "payload": {"n": -1}})
    await wait_for_status(client, str(first["id"]), {"succeeded"}, timeout=30)
    jobs = [{"type": "demo.sleep", "queue": queue, "payload": {"seconds": 0.02}}] * BACKLOG
    async with counted_reads(redis, queue) as reads:
        response = await client.post("/v1/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 202, response.text
        last = str(response.json()["jobs"][-1]["id"])
        await wait_for_status(client, last, {"succeeded"}, timeout=30)
    assert reads["band"] >= BACKLOG // 4, reads


async def _subscribed(pubsub: PubSub) -> None:
    """Until the server confirms the subscription (so no message sent after it is missed)."""
    for _ in range(10):
        message = await pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] == "subscribe":
            return
    raise AssertionError("the subscription was not confirmed in 10 s")


async def _claim_heard(
    client: httpx.AsyncClient, redis: Redis, settings: Settings, body: dict[str, Any]
) -> bool:
    """Submit ``body`` and listen: whether the job-change message of its claim (naming it as
    changed) arrives within CLAIM_HEARD_SECONDS, before any naming it terminal."""
    loop = asyncio.get_running_loop()
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(Keys(settings.redis_prefix).changes)
        await _subscribed(pubsub)
        job = UUID(str((await submit(client, body))["id"]))
        deadline = loop.time() + CLAIM_HEARD_SECONDS
        while (left := deadline - loop.time()) > 0:
            message = await pubsub.get_message(timeout=min(left, 0.2))
            change = decode(message["data"]) if message and message["type"] == "message" else None
            if change is not None and job in change.terminal:
                return False
            if change is not None and job in change.changed:
                return True
    return False


CLAIM_HEARD_SECONDS = 2.0


async def test_a_claims_message_is_not_held_back_by_a_worker_without_room(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, redis: Redis, settings: Settings
) -> None:
    """A claim's job-change message rides with its read loop's next read. A worker whose room
    is full (concurrency 1, a long job) reads nothing until the job ends, so there the message
    goes alone at once; a follower of the job hears of its start while it runs. The same on a
    worker with room, whose next read is the blocking one, at once."""
    for concurrency in (1, 16):
        q = f"{queue}-c{concurrency}"
        spawn.worker([q], concurrency=concurrency, name=f"room{concurrency}-{queue}")
        first = await submit(client, {"type": "demo.echo", "queue": q, "payload": {"n": -1}})
        await wait_for_status(client, str(first["id"]), {"succeeded"}, timeout=30)
        body = {"type": "demo.sleep", "queue": q, "payload": {"seconds": 4}}
        heard = await _claim_heard(client, redis, settings, body)
        assert heard, f"no claim message within 2 s of a 4 s job (concurrency {concurrency})"
