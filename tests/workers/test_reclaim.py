"""Reclaim: jobs of killed or frozen workers are finished elsewhere; live workers keep theirs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import httpx
from redis.asyncio import Redis

from app.settings import Settings
from app.streams.keys import DEFAULT_BAND, GROUP, Keys
from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Proc, Spawner


async def _events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    events: list[dict[str, Any]] = response.json()
    return events


async def _all_running(client: httpx.AsyncClient, ids: list[str]) -> bool:
    jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in ids]
    return all(j["status"] == "running" for j in jobs)


async def _pending_of(redis: Redis, stream: str) -> dict[str, int]:
    consumers = await redis.xinfo_consumers(stream, GROUP)
    return {c["name"]: int(c["pending"]) for c in consumers}


async def test_sigkilled_worker_jobs_are_finished_by_another(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    lost = spawn.worker([queue], concurrency=4, name=f"doomed-{queue}")
    jobs = [
        await submit(
            client,
            {
                "type": "test.nap",
                "queue": queue,
                "payload": {"seconds": 30, "until_attempt": 1},
            },
        )
        for _ in range(4)
    ]
    ids = [j["id"] for j in jobs]
    await wait_until(lambda: _all_running(client, ids), timeout=30)
    stream = Keys(settings.redis_prefix).stream(queue, 0, DEFAULT_BAND)
    assert (await _pending_of(redis, stream))[lost.name] == 4

    rescuer = spawn.worker([queue], concurrency=4, name=f"rescuer-{queue}")
    lost.signal(signal.SIGKILL)
    for job_id in ids:
        done = await wait_for_status(client, job_id, {"succeeded", "dead"}, timeout=60)
        assert done["status"] == "succeeded"
        assert done["attempts"] == 2
        assert done["result"] == {"worker": rescuer.name, "attempt": 2}
        [error] = done["errors"]
        assert error["attempt"] == 1
        assert error["error"] == "worker lost"
        assert error["worker"] == lost.name
        [reclaimed] = [e for e in await _events(client, job_id) if e["event"] == "reclaimed"]
        assert reclaimed["worker"] == lost.name
        assert reclaimed["actor"] == rescuer.name

    # The dead consumer's entries are claimed and acked (by the next XAUTOCLAIM with room,
    # once the retries are done), not dropped with the consumer.
    async def cleared() -> bool:
        idle = (await _pending_of(redis, stream)).get(lost.name, 0) == 0
        return idle and await redis.xlen(stream) == 0

    await wait_until(cleared, timeout=20)


async def test_job_longer_than_claim_idle_on_a_live_worker_runs_once(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    assert settings.claim_idle_seconds == 2.0
    spawn.worker([queue], name=f"first-{queue}")
    spawn.worker([queue], name=f"second-{queue}")  # idle, and looking for work to reclaim
    job = await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 5}})
    await wait_until(lambda: _all_running(client, [job["id"]]), timeout=30)
    [claim] = [e for e in await _events(client, job["id"]) if e["event"] == "claimed"]
    await asyncio.sleep(3.5)  # past the claim idle time, still running
    stream = Keys(settings.redis_prefix).stream(queue, 0, DEFAULT_BAND)
    everything: list[tuple[str, dict[str, str]]] = await redis.xrange(stream)  # type: ignore[assignment]
    entries = [i for i, f in everything if f.get("job") == job["id"]]
    owners = [
        p["consumer"]
        for i in entries
        for p in await redis.xpending_range(stream, GROUP, min=i, max=i, count=1)
    ]
    assert owners == [claim["worker"]]  # kept fresh by its worker, not taken over
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert done["errors"] == []
    assert done["result"]["attempt"] == 1
    names = [e["event"] for e in await _events(client, job["id"])]
    assert names == ["submitted", "claimed", "succeeded"]


async def test_frozen_worker_changes_nothing_after_its_job_was_reclaimed(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    frozen = spawn.worker([queue], name=f"frozen-{queue}")
    job = await submit(
        client,
        {"type": "test.nap", "queue": queue, "payload": {"seconds": 4, "until_attempt": 1}},
    )
    await wait_until(lambda: _all_running(client, [job["id"]]), timeout=30)
    frozen.signal(signal.SIGSTOP)
    rescuer = spawn.worker([queue], name=f"rescuer-{queue}")
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2
    assert done["result"] == {"worker": rescuer.name, "attempt": 2}
    assert [e["error"] for e in done["errors"]] == ["worker lost"]
    history = await _events(client, job["id"])

    frozen.signal(signal.SIGCONT)  # its handler finishes and reports attempt 1
    await wait_until(lambda: _logged(frozen, "fenced off"), timeout=30)
    await asyncio.sleep(2)  # a heartbeat and a maintenance round of the stale worker
    after = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert after == done
    assert await _events(client, job["id"]) == history
    assert frozen.alive()
    # Nothing is left behind in Redis either: every entry of the job was acked by its owner.
    stream = Keys(settings.redis_prefix).stream(queue, 0, DEFAULT_BAND)

    async def drained() -> bool:
        pending = await _pending_of(redis, stream)
        return await redis.xlen(stream) == 0 and not any(pending.values())

    await wait_until(drained, timeout=30)


async def _logged(proc: Proc, text: str) -> bool:
    return text in proc.output()


async def test_job_that_kills_its_worker_ends_dead_after_max_attempts(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    job = await submit(
        client, {"type": "test.crash", "queue": queue, "max_attempts": 3, "payload": {}}
    )
    crashes = 0

    async def supervise() -> None:
        nonlocal crashes
        proc = spawn.worker([queue], concurrency=1)
        while True:
            await asyncio.sleep(0.2)
            if not proc.alive():
                crashes += 1
                proc = spawn.worker([queue], concurrency=1)

    supervisor = asyncio.create_task(supervise())
    try:
        dead = await wait_for_status(client, job["id"], {"dead", "succeeded"}, timeout=120)
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
    assert dead["status"] == "dead"
    assert dead["attempts"] == 3
    assert [e["error"] for e in dead["errors"]] == ["worker lost"] * 3
    assert [e["attempt"] for e in dead["errors"]] == [1, 2, 3]
    assert crashes == 3
    listed = (await client.get("/v1/dlq", params={"queue": queue})).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]


async def test_pending_entry_deleted_from_the_stream_is_dispatched_again(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    """A consumer took the entry and vanished; then the entry itself was deleted (XDEL).
    XAUTOCLAIM reports only its id, so the job is found again through Postgres."""
    worker = spawn.worker([queue], concurrency=1, name=f"busy-{queue}")
    blocker = await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 6}})
    await wait_until(lambda: _all_running(client, [blocker["id"]]), timeout=30)
    job = await submit(client, {"type": "demo.echo", "queue": queue, "payload": {"n": 1}})
    stream = Keys(settings.redis_prefix).stream(queue, 0, DEFAULT_BAND)

    async def entry_ids() -> list[str]:
        reply: Any = await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=10)
        return [entry_id for _, entries in reply or [] for entry_id, _ in entries]

    taken = await wait_until(entry_ids, timeout=20)  # the worker is busy: the ghost gets it
    await redis.xdel(stream, *taken)
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "queued"

    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=60)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    # Found by XAUTOCLAIM (which reports the deleted id), by the reconcile's entry check, or
    # by the start-up re-dispatch when that ran after the XDEL: each goes through Postgres and
    # each is logged.
    output = worker.output()
    repaired = (
        "no longer existed",
        "had lost their stream entries",
        "whose stream entries were missing",
    )
    assert any(line in output for line in repaired), output
