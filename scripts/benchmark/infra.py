"""Throwaway databases, Redis key clean-up and the processes a run starts (and always stops)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.db.url import asyncpg_dsn, with_database

__all__ = ["dsn", "with_database"]
SCRIPTS = ROOT / "scripts"


dsn = asyncpg_dsn  # a libpq DSN (for asyncpg and the peers) from a SQLAlchemy URL


async def create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(dsn(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(dsn(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_keys(redis_url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (never FLUSHDB: the server is shared)."""
    redis = Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await redis.delete(*batch)
                batch = []
        if batch:
            deleted += await redis.delete(*batch)
    finally:
        await redis.aclose()
    return deleted


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no CONVEYOR_* of ours, the repo and scripts importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS)])
    env.update(extra)
    return env


@dataclass
class Processes:
    """Every process a run starts, each in its own session so its children stop with it."""

    log_dir: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.running.append(proc)
        return proc

    def python(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, *args], env)

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 20) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
        if proc in self.running:
            self.running.remove(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        # Children of a supervisor (taskiq, dramatiq, uvicorn) may outlive it briefly.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc, grace=10)


def py_spy() -> str:
    """The py-spy next to this Python (``pip install py-spy``), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str]]:
    """The Postgres server URL and Redis URL of CONVEYOR_TEST_DATABASE_URL and
    CONVEYOR_TEST_REDIS_URL, or embedded servers for those not set (stopped afterwards)."""
    from app.devserver import EmbeddedPostgres, EmbeddedRedis

    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-servers-"))
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    try:
        server = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
        redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL")
        if not server:
            pg = EmbeddedPostgres(tmp / "pg")
            server = pg.start()
            started.append(pg)
        if not redis_url:
            rd = EmbeddedRedis(tmp / "redis", persistent=False)
            redis_url = rd.start()
            started.append(rd)
        yield server, redis_url
    finally:
        for s in reversed(started):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def tree(pid: int) -> Iterator[psutil.Process]:
    """A process and all its descendants that are still alive."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        yield root
        yield from root.children(recursive=True)


def rss_mb(pid: int) -> list[float]:
    """Resident memory (MB) of each Python process in the tree that does work.

    A supervisor that only forks workers (uvicorn's, taskiq's and dramatiq's parent) is
    left out when it has children, so each figure is one working process.
    """
    procs = [p for p in tree(pid) if "resource_tracker" not in " ".join(_cmdline(p))]
    workers = [p for p in procs if not p.children()] if len(procs) > 1 else procs
    sizes = []
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            if "python" in p.name().lower() or p.pid == pid:
                sizes.append(p.memory_info().rss / 2**20)
    return sizes


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return list(p.cmdline())
    except psutil.Error:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole tree so far."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode} before answering")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/healthz", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")
