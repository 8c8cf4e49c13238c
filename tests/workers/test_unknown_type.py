"""A job type the API knows but a worker does not (a rolling deploy: new API first, workers
later). The worker hands the job back without counting an attempt, a little later each time,
so that workers that know the type get it; only after CONVEYOR_UNKNOWN_TYPE_GRACE_SECONDS
(from the job's creation, on the Postgres clock) does it go dead with `unknown job type`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from tests.conftest import submit, wait_for_status, wait_until
from tests.support.processes import Spawner

BUILT_IN_ONLY = "workers.handlers"  # as CONVEYOR_HANDLER_MODULES: no test.* job types


async def _events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()
    return events


async def _ready(client: httpx.AsyncClient, queue: str) -> None:
    """The worker runs jobs: a demo.echo went through."""
    echo = await submit(client, {"type": "demo.echo", "queue": queue})
    await wait_for_status(client, echo["id"], {"succeeded"}, timeout=30)


async def test_unknown_type_is_handed_back_until_the_grace_ends_then_dead(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    grace = 4.0
    old = spawn.worker(
        [queue],
        CONVEYOR_UNKNOWN_TYPE_GRACE_SECONDS=str(grace),
        CONVEYOR_HANDLER_MODULES=BUILT_IN_ONLY,
    )
    await _ready(client, queue)
    job = await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 0}})
    dead = await wait_for_status(client, job["id"], {"dead", "succeeded"}, timeout=40)
    assert dead["status"] == "dead"
    created = datetime.fromisoformat(dead["created_at"])
    finished = datetime.fromisoformat(dead["finished_at"])
    assert (finished - created).total_seconds() >= grace
    [error] = dead["errors"]
    assert error["error"] == "unknown job type 'test.nap'"
    assert error["attempt"] == dead["attempts"] == 1  # the hand-backs did not count
    events = [(e["event"], e["worker"]) for e in await _events(client, job["id"])]
    released = [e for e in events if e[0] == "released"]
    assert released and all(w == old.name for _, w in released)
    assert len(released) <= 2 * grace  # a second or more between hand-backs: no spinning
    assert events[-1] == ("dead", old.name)
    assert "unknown job type 'test.nap'" in old.output()


async def test_workers_that_know_the_type_run_what_others_handed_back(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    old = spawn.worker([queue], CONVEYOR_HANDLER_MODULES=BUILT_IN_ONLY)
    ids = [
        (await submit(client, {"type": "test.nap", "queue": queue, "payload": {"seconds": 0}}))[
            "id"
        ]
        for _ in range(3)
    ]

    async def all_handed_back() -> bool:
        for job_id in ids:
            if not any(e["event"] == "released" for e in await _events(client, job_id)):
                return False
        return True

    await wait_until(all_handed_back, timeout=30)
    new = spawn.worker([queue])  # the deploy reaches this worker: it knows test.nap
    for job_id in ids:
        done = await wait_for_status(client, job_id, {"succeeded", "dead"}, timeout=60)
        assert done["status"] == "succeeded"
        assert done["result"] == {"worker": new.name, "attempt": 1}
        assert done["attempts"] == 1
        assert done["errors"] == []
    assert old.alive()
