"""``--concurrency`` holds exactly, however many streams and XAUTOCLAIM pages feed a worker,
and ``--processes N`` runs N workers under one parent."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import httpx

from app.db.url import asyncpg_dsn as dsn
from app.settings import Settings
from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Proc, Spawner


async def _sleepers(client: httpx.AsyncClient, queue: str, n: int, seconds: float) -> list[str]:
    body = {"type": "demo.sleep", "queue": queue, "payload": {"seconds": seconds}}
    return [str((await submit(client, body))["id"]) for _ in range(n)]


async def test_concurrency_holds_across_queues(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings
) -> None:
    """Two queues (one read loop each), six 1.5 s jobs on each, --concurrency 2: never more
    than two of this worker's jobs are running at once, as Postgres records them."""
    other = f"{queue}-b"
    ids = await _sleepers(client, queue, 6, 1.5) + await _sleepers(client, other, 6, 1.5)
    worker = spawn.worker([queue, other], concurrency=2, name=f"narrow-{queue}")
    conn = await asyncpg.connect(dsn(settings.database_url))
    peak = 0
    try:
        while True:
            running, open_ = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'running' AND worker = $1),"
                " count(*) FILTER (WHERE status NOT IN ('succeeded', 'dead'))"
                " FROM jobs WHERE id = ANY($2::uuid[])",
                worker.name,
                ids,
            )
            peak = max(peak, running)
            if open_ == 0:
                break
            assert worker.alive()
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    assert peak == 2


async def _exit_code(proc: Proc, timeout: float) -> int:
    async def exited() -> bool:
        return not proc.alive()

    await wait_until(exited, timeout=timeout)
    code = proc.proc.returncode
    assert code is not None
    return code


async def test_processes_run_under_one_parent_that_forwards_sigterm(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    parent = spawn.worker([queue], concurrency=2, name=f"multi-{queue}", processes=2)

    async def children() -> set[str]:
        items = (await client.get("/v1/workers")).json()["items"]
        return {w["name"] for w in items if w["name"].startswith(parent.name)}

    async def both() -> set[str] | None:
        names = await children()
        return names if len(names) == 2 else None

    names = await wait_until(both, timeout=30)
    assert names == {f"{parent.name}-1", f"{parent.name}-2"}
    # Four 2 s jobs with --concurrency 2 per process: both processes take jobs.
    ids = await _sleepers(client, queue, 4, 2.0)
    done = [await wait_for_status(client, i, {"succeeded", "dead"}, timeout=60) for i in ids]
    assert {d["status"] for d in done} == {"succeeded"}
    workers_used = {e["worker"] for i in ids for e in await _claims(client, i)}
    assert workers_used == names

    pids = _child_pids(parent.pid)
    assert len(pids) == 2
    parent.signal(signal.SIGTERM)
    assert await _exit_code(parent, timeout=60) == 0
    assert not any(_alive(p) for p in pids)
    assert await children() == set()  # each child unregistered itself


async def _claims(client: httpx.AsyncClient, job_id: str) -> list[dict[str, str]]:
    events: list[dict[str, str]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    return [e for e in events if e["event"] == "claimed"]


def _child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
