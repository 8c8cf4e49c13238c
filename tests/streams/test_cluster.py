"""Conveyor on a real three-node Redis Cluster (Valkey from the embedded wheel)."""

from __future__ import annotations

from pathlib import Path

import httpx
import redis

from app.main import create_app
from app.streams.keys import Keys
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_until
from tests.faults.checker import drain
from tests.faults.harness import served_before, statuses, submit_marked
from tests.support.cluster import Cluster, cmd, slot_of
from tests.support.processes import Spawner


async def test_jobs_flow_through_partitions_spread_over_cluster_nodes(
    backends: Backends, cluster: Cluster, tmp_path: Path, queue: str
) -> None:
    settings = make_settings(
        backends,
        redis_url=f"redis://127.0.0.1:{cluster.ports[0]}/0",
        redis_cluster=True,
        partitions=6,
    )
    spawn = Spawner(settings, tmp_path)
    app = create_app(settings)
    try:
        spawn.worker([queue], concurrency=16)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
            ) as client:
                jobs = [
                    {"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(60)
                ]
                response = await client.post("/v1/jobs/batch", json={"jobs": jobs})
                assert response.status_code == 202
                ids = [j["id"] for j in response.json()["jobs"]]

                async def all_done() -> bool:
                    page = await client.get("/v1/jobs", params={"queue": queue, "limit": 100})
                    statuses = [j["status"] for j in page.json()["items"]]
                    return len(statuses) == len(ids) and set(statuses) == {"succeeded"}

                await wait_until(all_done, timeout=60)
                stats = (await client.get("/v1/queues")).json()["items"]
                assert next(s for s in stats if s["queue"] == queue)["waiting"] == 0
    finally:
        spawn.stop_all()
    # The partitions' streams live on more than one node (one hash slot per partition).
    keys = Keys(settings.redis_prefix)
    owners = set()
    for partition in range(settings.partitions):
        stream = keys.stream(queue, partition, 1)
        slot = cmd(redis.Redis(port=cluster.ports[0]), "CLUSTER", "KEYSLOT", stream)
        for port in cluster.ports:
            node = redis.Redis(port=port)
            if cmd(node, "CLUSTER", "COUNTKEYSINSLOT", slot) > 0:
                owners.add(port)
    assert len(owners) >= 2


async def test_a_node_restarted_without_its_last_writes_is_detected(
    backends: Backends, cluster: Cluster, tmp_path: Path, queue: str
) -> None:
    """A node loses the writes since its last save (a crash, or a failover to a lagging
    replica) while its epoch markers and consumer groups survive: the epoch of each partition
    it serves includes its run id, so the change is seen and the lost entries are re-sent."""
    settings = make_settings(
        backends,
        redis_url=f"redis://127.0.0.1:{cluster.ports[0]}/0",
        redis_cluster=True,
        partitions=6,
        reconcile_seconds=1.0,
        dispatch_check_seconds=3600.0,  # not the backstop: the epoch must see it
    )
    spawn = Spawner(settings, tmp_path)
    try:
        await served_before(spawn, settings, queue)
        for port in cluster.ports:  # markers and groups are saved; the jobs below are not
            cmd(redis.Redis(port=port), "SAVE")
        ids = await submit_marked(
            settings,
            [{"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(60)],
        )
        cluster.crash_and_restart(0)
        keys = Keys(settings.redis_prefix)
        node = redis.Redis(port=cluster.ports[0])
        lost = [
            p
            for p in range(settings.partitions)
            if cmd(node, "CLUSTER", "COUNTKEYSINSLOT", slot_of(node, keys.epoch(queue, p)))
        ]
        assert lost, "no partition lives on the restarted node"
        spawn.worker([queue], concurrency=16)
        await drain(settings.database_url, queue, timeout=30.0)
    finally:
        spawn.stop_all()
    assert await statuses(settings, ids) == ["succeeded"] * len(ids)
