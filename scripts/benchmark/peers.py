"""PgQueuer, taskiq (Redis Streams) and dramatiq (Redis), each used the way its docs show.

Each peer's worker processes run a no-op handler that records its start in a
:mod:`benchmark.probe`; the harness enqueues with the peer's own client. Enqueue→start
latency uses the enqueue time carried in the job. Worker modules: ``benchmark.peer_workers``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from benchmark import infra, load, probe
from benchmark.stats import percentile

INF = math.inf


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass
class Peer(ABC):
    """One peer system in one throwaway database / Redis namespace."""

    procs: infra.Processes
    database_url: str
    redis_url: str
    name: str = ""
    tag: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:8]}")
    probe_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-probe-")))

    @abstractmethod
    def worker_argv(self, processes: int, option: int) -> list[str]: ...

    how_enqueued = "one at a time"

    @abstractmethod
    async def enqueue_many(self, n: int) -> float:
        """Enqueue n no-op jobs with no worker running; returns jobs/s."""

    @abstractmethod
    async def enqueue_one(self, due: float) -> None: ...

    async def setup(self) -> None:  # noqa: B027 - optional hook
        pass

    async def teardown(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def env(self) -> dict[str, str]:
        return infra.python_env(
            BENCH_PROBE_DIR=str(self.probe_dir),
            BENCH_DATABASE_DSN=infra.dsn(self.database_url),
            BENCH_REDIS_URL=self.redis_url,
            BENCH_TAG=self.tag,
        )

    def start(self, processes: int, option: int) -> subprocess.Popen[bytes]:
        shutil.rmtree(self.probe_dir, ignore_errors=True)
        self.probe_dir.mkdir()
        return self.procs.start(
            f"{self.name}-worker", self.worker_argv(processes, option), self.env
        )

    async def wait_count(self, n: int, timeout: float) -> tuple[int, float, float, list[float]]:
        deadline = time.monotonic() + timeout
        while True:
            got = probe.read(self.probe_dir)
            if got[0] >= n or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)

    async def drain(
        self, n: int, processes: int, option: int, timeout: float
    ) -> tuple[float, float, list[float]]:
        """(enqueue jobs/s, drain jobs/s, worker RSS MB): n jobs loaded first, then drained."""
        rate_in = await self.enqueue_many(n)
        worker = self.start(processes, option)
        count, first, last, _ = await self.wait_count(n, timeout)
        rss = infra.rss_mb(worker.pid)
        self.procs.stop(worker)
        if count < n:
            raise RuntimeError(f"{self.name}: {count} of {n} jobs ran within {timeout} s")
        return rate_in, (count - 1) / (last - first), rss

    async def ready(self) -> None:
        await self.enqueue_one(time.time())
        if (await self.wait_count(1, 60))[0] < 1:
            raise RuntimeError(f"{self.name}: the worker did not start")

    async def latency(self, rate: float, seconds: float) -> tuple[float, float, int]:
        """Open-loop enqueue at ``rate`` against a running worker: p50, p99 (ms), jobs sent."""
        ran = probe.read(self.probe_dir)[0]
        warm = await load.open_loop_calls(self.enqueue_one, rate, load.WARMUP_SECONDS)
        await self.wait_count(ran + warm, 10)
        before = probe.read(self.probe_dir)[0]
        sent = await load.open_loop_calls(self.enqueue_one, rate, seconds)
        _, _, _, lat = await self.wait_count(before + sent, 10)
        lat = lat[before:] if len(lat) > before else []
        ms = [x * 1000 for x in lat] + [INF] * max(0, sent - len(lat))
        return percentile(ms, 50), percentile(ms, 99), sent


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class PgQueuerPeer(Peer):
    """PgQueuer on asyncpg; its schema goes into the throwaway database."""

    name: str = "pgqueuer"
    how_enqueued: str = "batches of 1000, straight into Postgres"
    _pool: object = None

    async def setup(self) -> None:
        import asyncpg
        from pgqueuer.db import AsyncpgPoolDriver
        from pgqueuer.queries import Queries

        pool = await asyncpg.create_pool(infra.dsn(self.database_url), min_size=2, max_size=16)
        self._pool = pool
        self.queries = Queries(AsyncpgPoolDriver(pool))
        await self.queries.install()

    async def teardown(self) -> None:
        if self._pool is not None:
            await self._pool.close()  # type: ignore[attr-defined]

    def worker_argv(self, processes: int, option: int) -> list[str]:
        return _py("benchmark.peer_workers", "pgqueuer", str(processes), str(option))

    async def enqueue_many(self, n: int, batch: int = 1000) -> float:
        start = time.perf_counter()
        for i in range(0, n, batch):
            size = min(batch, n - i)
            await self.queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        return n / (time.perf_counter() - start)

    async def enqueue_one(self, due: float) -> None:
        await self.queries.enqueue("noop", repr(due).encode())


@dataclass
class TaskiqPeer(Peer):
    """taskiq with taskiq-redis's ``RedisStreamBroker`` (a consumer group on one stream)."""

    name: str = "taskiq"
    how_enqueued: str = "one kiq per job, sequential"

    async def setup(self) -> None:
        from benchmark.peer_workers import taskiq_broker

        self.broker, self.task = taskiq_broker(self.redis_url, self.tag)
        await self.broker.startup()  # creates the consumer group before the first kick

    async def teardown(self) -> None:
        await self.broker.shutdown()
        await infra.delete_keys(self.redis_url, f"{self.tag}*")

    def worker_argv(self, processes: int, option: int) -> list[str]:
        broker = "benchmark.peer_workers:taskiq_worker_broker"
        return _py(
            "taskiq", "worker", broker, "--workers", str(processes), "--log-level", "WARNING"
        )

    async def enqueue_many(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):  # sequential: faster than many in flight (one pool connection)
            await self.task.kiq(None)
        return n / (time.perf_counter() - start)

    async def enqueue_one(self, due: float) -> None:
        await self.task.kiq(due)


@dataclass
class DramatiqPeer(Peer):
    """dramatiq with its Redis broker, sync actor, default 8 threads per process."""

    name: str = "dramatiq"
    how_enqueued: str = "one enqueue per job, sequential (sync client)"

    async def setup(self) -> None:
        from benchmark.peer_workers import dramatiq_broker

        self.broker = dramatiq_broker(self.redis_url, self.tag)

    async def teardown(self) -> None:
        self.broker.close()
        await infra.delete_keys(self.redis_url, f"{self.tag}*")

    def worker_argv(self, processes: int, option: int) -> list[str]:
        return _py(
            "dramatiq",
            "benchmark.peer_workers:dramatiq_worker_broker",
            "--processes",
            str(processes),
        )

    def _send(self, due: float | None) -> None:
        from dramatiq import Message

        self.broker.enqueue(
            Message(queue_name="default", actor_name="noop", args=(due,), kwargs={}, options={})
        )

    async def enqueue_many(self, n: int) -> float:
        def run() -> float:
            start = time.perf_counter()
            for _ in range(n):
                self._send(None)
            return n / (time.perf_counter() - start)

        return await asyncio.to_thread(run)

    async def enqueue_one(self, due: float) -> None:
        await asyncio.to_thread(self._send, due)
