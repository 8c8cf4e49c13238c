"""A worker's name is its stable identity (its Redis consumer, the ``worker`` of its attempts):
one live process per name. A second process with a live worker's name is refused; a crashed
worker's name is taken over once its heartbeat lapses; a worker whose name was taken over while
it was frozen exits when it wakes."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from app.settings import Settings
from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Proc, Spawner
from workers.shutdown import EXIT_DISPLACED, EXIT_NAME_IN_USE, EXIT_USAGE


async def _holder_pid(settings: Settings, name: str) -> int | None:
    """The pid in the name's ``workers`` row, however old its heartbeat."""
    dsn = make_url(settings.database_url).set(drivername="postgresql")
    conn = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        pid: int | None = await conn.fetchval("SELECT pid FROM workers WHERE name = $1", name)
        return pid
    finally:
        await conn.close()


async def _registered(settings: Settings, proc: Proc, timeout: float = 30) -> None:
    async def check() -> bool:
        return await _holder_pid(settings, proc.name) == proc.pid

    await wait_until(check, timeout=timeout, interval=0.2)


async def _exited(proc: Proc, timeout: float) -> int:
    async def check() -> bool:
        return not proc.alive()

    await wait_until(check, timeout=timeout)
    code = proc.proc.returncode
    assert code is not None
    return code


async def _echo_runs(client: httpx.AsyncClient, queue: str) -> dict[str, Any]:
    job = await submit(client, {"type": "demo.echo", "queue": queue})
    return await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=30)


async def test_second_worker_with_a_live_name_is_refused_and_the_first_keeps_its_jobs(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    name = f"stable-{queue}"
    first = spawn.worker([queue], name=name)
    await _registered(settings, first)
    job = await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 4}})
    await wait_for_status(client, job["id"], {"running"}, timeout=30)

    second = spawn.worker([queue], name=name)
    assert await _exited(second, timeout=settings.claim_idle_seconds + 15) == EXIT_NAME_IN_USE
    assert f"worker name {name!r} is in use" in second.output()
    assert first.alive()
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"}, timeout=30)
    assert (done["status"], done["attempts"]) == ("succeeded", 1)
    events = [e["event"] for e in (await client.get(f"/v1/jobs/{job['id']}/events")).json()]
    assert events == ["submitted", "claimed", "succeeded"]
    assert await _holder_pid(settings, name) == first.pid


async def test_simultaneous_starts_with_one_name_leave_one_worker(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    name = f"stable-{queue}"
    procs = [spawn.worker([queue], name=name) for _ in range(3)]

    async def two_refused() -> bool:
        return sum(not p.alive() for p in procs) == 2

    await wait_until(two_refused, timeout=settings.claim_idle_seconds + 30)
    [survivor] = [p for p in procs if p.alive()]
    assert [p.proc.returncode for p in procs if p is not survivor] == [EXIT_NAME_IN_USE] * 2
    await _registered(settings, survivor)
    assert (await _echo_runs(client, queue))["status"] == "succeeded"


async def test_crashed_worker_name_is_taken_over_once_its_heartbeat_lapses(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    name = f"stable-{queue}"
    # a lease longer than a process's start-up, so that the successor has to wait for it
    slow = settings.model_copy(update={"claim_idle_seconds": 8.0})
    crashed = spawn.worker([queue], name=name, settings=slow)
    await _registered(settings, crashed)
    crashed.signal(signal.SIGKILL)
    successor = spawn.worker([queue], name=name, settings=slow)  # as a supervisor restarts it
    await _registered(settings, successor, timeout=slow.claim_idle_seconds + 30)
    assert successor.alive()
    output = successor.output()
    assert f"worker name {name!r} is held by" in output and "waiting" in output
    assert "took over worker name" in output
    assert (await _echo_runs(client, queue))["status"] == "succeeded"


async def test_frozen_worker_whose_name_was_taken_over_exits_when_it_wakes(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    name = f"stable-{queue}"
    frozen = spawn.worker([queue], name=name)
    await _registered(settings, frozen)
    frozen.signal(signal.SIGSTOP)
    successor = spawn.worker([queue], name=name)
    await _registered(settings, successor, timeout=settings.claim_idle_seconds + 30)
    frozen.signal(signal.SIGCONT)
    assert await _exited(frozen, timeout=20) == EXIT_DISPLACED
    assert "was taken over" in frozen.output()
    await asyncio.sleep(settings.claim_idle_seconds)
    assert successor.alive()
    assert await _holder_pid(settings, name) == successor.pid
    assert (await _echo_runs(client, queue))["status"] == "succeeded"


async def test_unusable_name_is_refused_at_start(spawn: Spawner, queue: str) -> None:
    """A name that could not serve as a consumer name and a column value (control characters,
    bytes that are not UTF-8) is a usage error, not an endless wait for Postgres."""
    for name in ("tab\tname", "bad-\udcff-bytes", "x" * 201):
        proc = spawn.worker([queue], name=name)
        assert await _exited(proc, timeout=30) == EXIT_USAGE
        assert "--name" in proc.output()
