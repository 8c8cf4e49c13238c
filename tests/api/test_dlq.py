"""The dead-letter queue: dead jobs listed, notified on `<prefix>:dlq`, replayed, removed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from app.jobs import service
from app.jobs.repository import Target
from app.main import create_app
from app.settings import Settings
from app.streams.keys import Keys
from tests.conftest import Backends, make_settings, submit, wait_for_status, wait_until
from tests.support.processes import Spawner

ADMIN_SECRET = "dlq-test-admin-secret"
PRODUCER_SECRET = "dlq-test-producer-secret"
ADMIN_ACTOR = "dlq-admin"


@pytest.fixture
def settings(backends: Backends) -> Settings:
    return make_settings(
        backends, api_keys=f"admin:{ADMIN_ACTOR}:{ADMIN_SECRET},producer:{PRODUCER_SECRET}"
    )


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> httpx.AsyncClient:
    client.headers["Authorization"] = f"Bearer {ADMIN_SECRET}"
    return client


async def _events(client: httpx.AsyncClient, job_id: str) -> list[str]:
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    return [e["event"] for e in response.json()]


async def _dead_job(client: httpx.AsyncClient, queue: str, gate: Path) -> dict[str, Any]:
    """A one-attempt job that fails while ``gate`` does not exist, run until it is dead."""
    body = {
        "type": "test.gate",
        "queue": queue,
        "max_attempts": 1,
        "payload": {"path": str(gate)},
    }
    job = await submit(client, body)
    dead = await wait_for_status(client, job["id"], {"dead", "succeeded"}, timeout=30)
    assert dead["status"] == "dead"
    return dead


async def _dlq_ids(client: httpx.AsyncClient, queue: str) -> set[str]:
    response = await client.get("/v1/dlq", params={"queue": queue, "limit": 500})
    assert response.status_code == 200
    return {item["id"] for item in response.json()["items"]}


async def test_exhausted_job_is_dead_listed_and_notified_on_the_dlq_stream(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, settings: Settings, redis: Redis
) -> None:
    spawn.worker([queue])
    job = await submit(
        admin,
        {"type": "demo.fail", "queue": queue, "max_attempts": 2, "payload": {"message": "boom"}},
    )
    dead = await wait_for_status(admin, job["id"], {"dead", "succeeded"}, timeout=60)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 2

    page = (await admin.get("/v1/dlq", params={"queue": queue})).json()
    [listed] = page["items"]
    assert listed["id"] == job["id"]
    assert [(e["attempt"], e["error"]) for e in listed["errors"]] == [(1, "boom"), (2, "boom")]
    assert page["next_cursor"] is None
    by_type = (await admin.get("/v1/dlq", params={"queue": queue, "type": "demo.echo"})).json()
    assert by_type["items"] == []

    async def notified() -> list[dict[str, str]]:
        entries: list[tuple[str, dict[str, str]]] = await redis.xrange(  # type: ignore[assignment]
            Keys(settings.redis_prefix).dlq
        )
        return [fields for _, fields in entries if fields.get("job") == job["id"]]

    [entry] = await wait_until(notified, timeout=20)
    assert entry["type"] == "demo.fail"
    assert entry["queue"] == queue
    assert entry["attempts"] == "2"
    assert [e["error"] for e in json.loads(entry["errors"])] == ["boom", "boom"]


async def test_replay_runs_again_with_attempts_reset_and_history_kept(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    spawn.worker([queue])
    # Fails while the gate is closed; the gate is open by the time we replay it.
    gate = tmp_path / "gate"
    dead = await _dead_job(admin, queue, gate)
    gate.touch()

    response = await admin.post(f"/v1/dlq/{dead['id']}/replay")
    assert response.status_code == 202, response.text
    replayed = response.json()
    assert replayed["status"] == "queued"
    assert replayed["attempts"] == 0
    assert replayed["errors"] == dead["errors"]
    assert replayed["finished_at"] is None

    done = await wait_for_status(admin, dead["id"], {"succeeded", "dead"}, timeout=30)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert done["result"] == {"attempt": 1}
    assert [e["error"] for e in done["errors"]] == ["gate closed"]
    assert dead["id"] not in await _dlq_ids(admin, queue)

    history = (await admin.get(f"/v1/jobs/{dead['id']}/events")).json()
    assert [e["event"] for e in history] == [
        "submitted",
        "claimed",
        "dead",
        "replayed",
        "claimed",
        "succeeded",
    ]
    [event] = [e for e in history if e["event"] == "replayed"]
    assert event["actor"] == ADMIN_ACTOR
    assert event["attempt"] == 0


async def test_replay_of_a_job_not_in_the_dlq_is_404_and_needs_admin(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    spawn.worker([queue])
    ok = await submit(admin, {"type": "demo.echo", "queue": queue, "payload": {}})
    await wait_for_status(admin, ok["id"], {"succeeded"}, timeout=30)
    response = await admin.post(f"/v1/dlq/{ok['id']}/replay")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"

    dead = await _dead_job(admin, queue, tmp_path / "never")
    as_producer = await admin.post(
        f"/v1/dlq/{dead['id']}/replay", headers={"Authorization": f"Bearer {PRODUCER_SECRET}"}
    )
    assert as_producer.status_code == 403
    assert (await admin.get(f"/v1/jobs/{dead['id']}")).json()["status"] == "dead"


async def test_bulk_replay_by_ids_and_by_type(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    spawn.worker([queue], concurrency=8)
    gate = tmp_path / "gate"
    fails = [await _dead_job(admin, queue, gate) for _ in range(4)]
    permanent = await submit(
        admin, {"type": "test.permanent", "queue": queue, "max_attempts": 3, "payload": {}}
    )
    await wait_for_status(admin, permanent["id"], {"dead"}, timeout=30)
    assert await _dlq_ids(admin, queue) == {j["id"] for j in fails} | {permanent["id"]}
    gate.touch()

    by_ids = await admin.post("/v1/dlq/replay", json={"ids": [fails[0]["id"], fails[1]["id"]]})
    assert by_ids.status_code == 202
    assert by_ids.json() == {"replayed": 2}
    for job in fails[:2]:
        await wait_for_status(admin, job["id"], {"succeeded"}, timeout=30)
    assert await _dlq_ids(admin, queue) == {fails[2]["id"], fails[3]["id"], permanent["id"]}

    by_type = await admin.post("/v1/dlq/replay", json={"type": "test.gate", "queue": queue})
    assert by_type.status_code == 202
    assert by_type.json() == {"replayed": 2}
    for job in fails[2:]:
        await wait_for_status(admin, job["id"], {"succeeded"}, timeout=30)
    assert await _dlq_ids(admin, queue) == {permanent["id"]}

    again = await admin.post("/v1/dlq/replay", json={"type": "test.gate", "queue": queue})
    assert again.json() == {"replayed": 0}
    empty = await admin.post("/v1/dlq/replay", json={})
    assert empty.status_code == 422


async def test_bulk_replay_by_creation_time(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    """`created_after` and `created_before` narrow a filter (bounds excluded), as in the
    listing; they are what the dashboard's "replay all matching" sends for its time range."""
    spawn.worker([queue], concurrency=4)
    gate = tmp_path / "gate"
    early = [await _dead_job(admin, queue, gate) for _ in range(2)]
    late = [await _dead_job(admin, queue, gate) for _ in range(2)]
    gate.touch()

    after = await admin.post(
        "/v1/dlq/replay", json={"queue": queue, "created_after": early[-1]["created_at"]}
    )
    assert after.status_code == 202, after.text
    assert after.json() == {"replayed": 2}
    for job in late:
        await wait_for_status(admin, job["id"], {"succeeded"}, timeout=30)
    assert await _dlq_ids(admin, queue) == {j["id"] for j in early}

    none_before = await admin.post(
        "/v1/dlq/replay", json={"queue": queue, "created_before": early[0]["created_at"]}
    )
    assert none_before.json() == {"replayed": 0}
    before = await admin.post(
        "/v1/dlq/replay", json={"created_before": late[0]["created_at"], "queue": queue}
    )
    assert before.json() == {"replayed": 2}
    for job in early:
        await wait_for_status(admin, job["id"], {"succeeded"}, timeout=30)

    for bad in ("yesterday", "2026-01-01T00:00:00", 5):
        refused = await admin.post("/v1/dlq/replay", json={"created_after": bad})
        assert refused.status_code == 422, bad


async def test_delete_takes_a_job_out_of_the_dlq_and_keeps_it_dead(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    spawn.worker([queue])
    dead = await _dead_job(admin, queue, tmp_path / "never")
    response = await admin.delete(f"/v1/dlq/{dead['id']}")
    assert response.status_code == 204
    assert dead["id"] not in await _dlq_ids(admin, queue)
    job = (await admin.get(f"/v1/jobs/{dead['id']}")).json()
    assert job["status"] == "dead"
    assert job["errors"] == dead["errors"]
    assert (await admin.delete(f"/v1/dlq/{dead['id']}")).status_code == 404
    assert (await admin.post(f"/v1/dlq/{dead['id']}/replay")).status_code == 404
    assert (await _events(admin, dead["id"]))[-1] == "dlq_removed"


async def test_concurrent_replays_of_one_job_queue_it_once(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    spawn.worker([queue])
    gate = tmp_path / "gate"
    dead = await _dead_job(admin, queue, gate)
    gate.touch()

    singles = [admin.post(f"/v1/dlq/{dead['id']}/replay") for _ in range(6)]
    bulks = [admin.post("/v1/dlq/replay", json={"ids": [dead["id"]]}) for _ in range(6)]
    responses = await asyncio.gather(*singles, *bulks)
    single_ok = sum(r.status_code == 202 for r in responses[:6])
    assert all(r.status_code in (202, 404) for r in responses[:6])
    bulk_replayed = sum(r.json()["replayed"] for r in responses[6:])
    assert single_ok + bulk_replayed == 1

    done = await wait_for_status(admin, dead["id"], {"succeeded", "dead"}, timeout=30)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    await asyncio.sleep(1.0)  # any duplicate delivery would have been claimed by now
    names = await _events(admin, dead["id"])
    assert names.count("replayed") == 1
    assert names.count("claimed") == 2  # the first run and exactly one new run
    assert names[-1] == "succeeded"


async def _queue_stats(client: httpx.AsyncClient, queue: str) -> dict[str, Any]:
    items = (await client.get("/v1/queues")).json()["items"]
    found: list[dict[str, Any]] = [q for q in items if q["queue"] == queue]
    return found[0] if found else {}


async def _until_all_dead(client: httpx.AsyncClient, queue: str, n: int) -> None:
    async def all_dead() -> bool:
        return (await _queue_stats(client, queue)).get("dead") == n

    await wait_until(all_dead, timeout=120, interval=0.5)


async def test_bulk_replay_spans_several_chunks(
    admin: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    n = 1001  # two full replay chunks of 500 and one more
    worker = spawn.worker([queue], concurrency=64)
    item = {"type": "test.permanent", "queue": queue, "payload": {}}
    for size in (500, n - 500):
        response = await admin.post("/v1/jobs/batch", json={"jobs": [item] * size})
        assert response.status_code == 202, response.text
    await _until_all_dead(admin, queue, n)
    assert worker.stop() == 0  # replayed jobs now stay queued, so they can be counted

    by_filter = await admin.post("/v1/dlq/replay", json={"type": "test.permanent", "queue": queue})
    assert by_filter.json() == {"replayed": n}
    stats = await _queue_stats(admin, queue)
    assert (stats["waiting"], stats["dead"]) == (n, 0)

    spawn.worker([queue], concurrency=64)
    await _until_all_dead(admin, queue, n)
    ids: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"queue": queue, "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = (await admin.get("/v1/dlq", params=params)).json()
        ids += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(set(ids)) == n
    by_ids = await admin.post("/v1/dlq/replay", json={"ids": ids})
    assert by_ids.json() == {"replayed": n}


async def test_bulk_replay_by_filter_ends_when_replayed_jobs_die_again_at_once(
    settings: Settings, spawn: Spawner, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay by filter takes the DLQ as it was when the request began: jobs that die again
    while it runs (a permanent failure, an unknown type) are not replayed a second time."""
    monkeypatch.setattr(service, "REPLAY_CHUNK", 3)
    spawn.worker([queue], concurrency=8)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN_SECRET}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=headers
        ) as admin:
            item = {"type": "test.permanent", "queue": queue, "payload": {}}
            response = await admin.post("/v1/jobs/batch", json={"jobs": [item] * 6})
            assert response.status_code == 202, response.text
            ids = [j["id"] for j in response.json()["jobs"]]
            await _until_all_dead(admin, queue, 6)

            state = app.state.conveyor
            send = state.dispatcher.send_after_commit

            async def send_then_wait_until_dead_again(targets: Sequence[Target]) -> None:
                """Each replayed chunk dies again (a real worker runs it) before the next."""
                await send(targets)
                if not targets:
                    return

                async def dead_again() -> bool:
                    async with state.sessions() as session:
                        statuses = await session.scalars(
                            text("SELECT status FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
                            {"ids": [t.id for t in targets]},
                        )
                        return set(statuses) == {"dead"}

                await wait_until(dead_again, timeout=30)

            monkeypatch.setattr(
                state.dispatcher, "send_after_commit", send_then_wait_until_dead_again
            )
            async with asyncio.timeout(60):
                by_filter = await admin.post(
                    "/v1/dlq/replay", json={"type": "test.permanent", "queue": queue}
                )
            assert by_filter.json() == {"replayed": 6}
            for job_id in ids:
                assert (await _events(admin, job_id)).count("replayed") == 1, job_id
