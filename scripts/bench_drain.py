#!/usr/bin/env python
"""Drain benchmark: how fast real worker processes empty a backlog of no-op jobs.

    .venv/bin/python scripts/bench_drain.py [--jobs 20000] [--concurrency 64] \
        [--processes 1,2] [--repeat 3] [--profile DIR]

Each round pre-loads N ``demo.echo`` jobs (committed in Postgres and XADDed, as the API
would), starts ``conveyor worker`` and times the drain from the first claim to the last
success, as Postgres recorded them (process start-up is not counted). Every claim and every
outcome is a guarded statement in Postgres with its event rows, as in production.

Baseline, in the same invocation: the same number of entries through a bare Redis Stream
consumer group (XADD, XREADGROUP of 500, XACK + XDEL), with no Postgres at all.

Also printed: the workers' peak RSS. ``--profile DIR`` runs each worker under ``py-spy
record`` and writes collapsed stacks there. Uses CONVEYOR_TEST_DATABASE_URL and
CONVEYOR_TEST_REDIS_URL (a throwaway database is created and dropped; keys get a unique
prefix and are deleted).

``--limit concurrency=N`` / ``--limit rate=N/s`` (repeatable) sets limits on ``demo.echo``
before the rounds, as ``PUT /v1/job-types/demo.echo/limits`` would: the cost of the claim
under limits (ADR 0014).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.engine import create_engine, create_session_factory
from app.db.migrate import upgrade
from app.flow.limits import parse_rate
from app.jobs import repository
from app.jobs.dispatch import Dispatcher
from app.jobs.ids import new_job_id
from app.jobs.marks import EPOCH_KEY_PREFIX
from app.jobs.newjob import NewJob, dump_json
from app.jobs.repository import Target
from app.jobs.status import JobStatus
from app.settings import Settings
from app.streams.client import StreamClient
from app.streams.connection import create_redis
from app.streams.keys import Keys

QUEUE = "bench-drain"
LOAD_CHUNK = 5000


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(_dsn(server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def bare_stream(redis_url: str, n: int, count: int = 500) -> float:
    """Entries per second through a consumer group with no Postgres: the floor of our cost."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    key = f"bench-bare-{uuid.uuid4().hex[:8]}"
    await redis.xgroup_create(key, "g", id="0", mkstream=True)
    start = time.perf_counter()
    for i in range(0, n, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(1000, n - i)):
                pipe.xadd(key, {"job": str(uuid.uuid4())})
            await pipe.execute()
    done = 0
    while done < n:
        reply: Any = await redis.xreadgroup("g", "c", {key: ">"}, count=count)
        ids = [e for _, entries in reply for e, _ in entries]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(key, "g", *ids)
            pipe.xdel(key, *ids)
            await pipe.execute()
        done += len(ids)
    elapsed = time.perf_counter() - start
    await redis.delete(key)
    await redis.aclose()
    return n / elapsed


def _row(n: int) -> NewJob:
    return NewJob(
        id=new_job_id(),
        type="demo.echo",
        queue=QUEUE,
        status=JobStatus.QUEUED,
        priority=0,
        payload_json=dump_json({"n": n}),
        max_attempts=3,
        timeout_seconds=None,
        idempotency_key=None,
        idempotency_scope="",
        request_hash=None,
        owner=None,
        run_at=None,
    )


async def preload(settings: Settings, n: int) -> None:
    """Commit N queued jobs, then XADD them (the API's order), in chunks."""
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    stream = StreamClient(create_redis(settings), Keys(settings.redis_prefix), maxlen=n + 1000)
    dispatcher = Dispatcher(stream, sessions, settings.partitions)
    try:
        for start in range(0, n, LOAD_CHUNK):
            rows = [_row(i) for i in range(start, min(n, start + LOAD_CHUNK))]
            async with sessions.begin() as session:
                jobs = await repository.insert_jobs(session, rows)
            await dispatcher.send_committed([Target(j.id, j.queue, j.priority) for j in jobs])
    finally:
        await stream.close()
        await engine.dispose()


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_DATABASE_URL=settings.database_url,
        CONVEYOR_REDIS_URL=settings.redis_url,
        CONVEYOR_REDIS_PREFIX=settings.redis_prefix,
        CONVEYOR_STREAM_MAXLEN=str(settings.stream_maxlen),
        CONVEYOR_LOG_LEVEL=settings.log_level,
        PYTHONPATH=str(ROOT),
    )
    return env


def spawn_workers(
    settings: Settings, processes: int, concurrency: int, tag: str
) -> list[subprocess.Popen[bytes]]:
    """``conveyor worker`` processes; with ``--processes`` support, one parent for all."""
    argv = [sys.executable, "-m", "app.cli", "worker", "--queues", QUEUE]
    argv += ["--concurrency", str(concurrency)]
    if processes > 1 and _has_processes_flag():
        cmds = [[*argv, "--processes", str(processes), "--name", f"bench-{tag}"]]
    else:
        cmds = [[*argv, "--name", f"bench-{tag}-{i}"] for i in range(processes)]
    return [subprocess.Popen(cmd, cwd=ROOT, env=_env(settings)) for cmd in cmds]


def attach_profilers(procs: list[subprocess.Popen[bytes]], out: Path, tag: str) -> list[Any]:
    """``py-spy record`` on each worker process (and its children): collapsed stacks."""
    spy = ["py-spy", "record", "--subprocesses", "--format", "raw", "-r", "200"]
    return [
        subprocess.Popen(
            [*spy, "--pid", str(p.pid), "-o", str(out / f"{tag}-{i}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, p in enumerate(procs)
    ]


def _has_processes_flag() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return "--processes" in out.stdout


def _peak_rss_mb(pids: list[int]) -> float:
    """The largest resident memory of any one of these processes or their descendants (not
    counting py-spy), in MB."""
    best = 0.0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            status = Path(f"/proc/{pid}/status").read_text()
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        todo += [int(c) for c in children]
        if b"py-spy" in exe:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                best = max(best, int(line.split()[1]) / 1024)
    return best


async def _wait_epoch(conn: asyncpg.Connection, timeout: float = 60) -> None:
    """Until a worker recorded the queue's Redis data epoch (not merely the stream layout,
    which is recorded first: stopping the warm-up worker then made the measured worker's
    first start re-send the whole backlog)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await conn.fetchval(
            "SELECT count(*) FROM conveyor_state WHERE starts_with(key, $1)", EPOCH_KEY_PREFIX
        ):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("no worker recorded the Redis epoch")


@dataclass
class Round:
    rate: float  # jobs/s from the first claim to the last success
    wall: float  # seconds from spawning the workers to the last success
    rss: float  # the largest RSS of any worker process, MB
    cpu_ms: float  # worker CPU (user + system, all processes) per 1000 jobs, ms


async def _stream_backlog(redis: Redis, streams: list[str]) -> tuple[int, int]:
    """Entries in the queue's streams, and how many of them are delivered and not acked."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xpending(stream, "conveyor")
        replies = await pipe.execute(raise_on_error=False)
    entries = sum(r for r in replies[0::2] if isinstance(r, int))
    pending = sum(r["pending"] for r in replies[1::2] if isinstance(r, dict))
    return entries, pending


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their descendants (not py-spy)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        todo += [int(c) for c in children]
        if "(py-spy)" in stat:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def drain_round(
    settings: Settings,
    conn: asyncpg.Connection,
    n: int,
    processes: int,
    concurrency: int,
    profile: Path | None,
    tag: str,
) -> Round:
    """Load N jobs, start the workers, wait until every job succeeded."""
    await conn.execute("TRUNCATE jobs, job_events")
    await preload(settings, n)
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    streams = Keys(settings.redis_prefix).queue_streams(QUEUE, settings.partitions)
    spawned = time.monotonic()
    procs = spawn_workers(settings, processes, concurrency, tag)
    pids = [p.pid for p in procs]
    spies = [] if profile is None else attach_profilers(procs, profile, tag)
    rss = 0.0
    cpu_start: float | None = None
    try:
        deadline = time.monotonic() + max(120.0, n / 200)
        done = 0
        while True:
            # Watched on the streams (a finished job's entry is deleted), and in Postgres only
            # once they are empty: a count over the jobs table ten times a second took a
            # tenth of a core from the drain it watched.
            entries, pending = await _stream_backlog(redis, streams)
            if cpu_start is None and (pending or entries < n):
                cpu_start = _cpu_seconds(pids)
            rss = max(rss, _peak_rss_mb(pids))
            if not entries and not pending:
                done = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
                if done >= n:
                    break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(
                    f"drain stalled: {entries} entries in the streams, {pending} pending,"
                    f" {done}/{n} succeeded when last counted"
                )
            await asyncio.sleep(0.2)
        cpu = _cpu_seconds(pids) - (cpu_start or 0.0)
        wall = time.monotonic() - spawned
        span = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs"
        )
    finally:
        await redis.aclose()
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(60)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return Round(n / float(span), wall, rss, cpu * 1e6 / n)


async def _set_limits(conn: asyncpg.Connection, limits: dict[str, str]) -> None:
    count, period = parse_rate(limits["rate"]) if "rate" in limits else (None, None)
    concurrency = int(limits["concurrency"]) if "concurrency" in limits else None
    await conn.execute(
        "INSERT INTO flow_controls (scope, name, limits_set, concurrency, rate_count, rate_period)"
        " VALUES ('type', 'demo.echo', true, $1, $2, $3)",
        concurrency,
        count,
        period,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", default="1", help="comma-separated, e.g. 1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="the workers' CONVEYOR_LOG_LEVEL (conveyor worker's own default is INFO: one line"
        " per transition)",
    )
    parser.add_argument(
        "--limit", action="append", default=[], help="concurrency=N or rate=N/s on demo.echo"
    )
    args = parser.parse_args()
    limits = dict(item.split("=", 1) for item in args.limit)
    server = os.environ.get(
        "CONVEYOR_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if args.profile is not None:
        if shutil.which("py-spy") is None:
            sys.exit("--profile needs py-spy on PATH")
        args.profile.mkdir(parents=True, exist_ok=True)
    name = f"conveyor_bench_{uuid.uuid4().hex[:8]}"
    await _admin(server, f'CREATE DATABASE "{name}"')
    db_url = make_url(server).set(database=name).render_as_string(hide_password=False)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=db_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        stream_maxlen=max(100000, args.jobs + 1000),
        log_level=args.log_level,
    )
    try:
        await asyncio.to_thread(upgrade, db_url)
        conn = await asyncpg.connect(_dsn(db_url))
        # A first start records the Redis epoch (and would re-send every queued job): get it
        # out of the way before any backlog exists.
        first = spawn_workers(settings, 1, 1, "warmup")
        await _wait_epoch(conn)
        for p in first:
            p.send_signal(signal.SIGTERM)
            p.wait(60)
        if limits:
            await _set_limits(conn, limits)
        results: dict[int, list[Round]] = {}
        floors: list[float] = []
        for r in range(args.repeat):
            floors.append(await bare_stream(redis_url, args.jobs))
            for procs in [int(p) for p in args.processes.split(",")]:
                tag = f"p{procs}-r{r}"
                one_round = await drain_round(
                    settings, conn, args.jobs, procs, args.concurrency, args.profile, tag
                )
                results.setdefault(procs, []).append(one_round)
                print(
                    f"  round {r}, {procs} process(es): {one_round.rate:8.0f} jobs/s,"
                    f" {one_round.wall:.1f} s wall, worker CPU {one_round.cpu_ms:.0f} ms"
                    f" per 1000 jobs, peak RSS {one_round.rss:.0f} MB",
                    flush=True,
                )
        await conn.close()
    finally:
        await _admin(server, f'DROP DATABASE "{name}" WITH (FORCE)')
        redis = Redis.from_url(redis_url)
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    floor = statistics.median(floors)
    print(f"\n{args.jobs} demo.echo jobs, --concurrency {args.concurrency}, {args.repeat} rounds")
    if limits:
        print(f"limits on demo.echo: {limits}")
    print(f"bare stream (no Postgres)   : {floor:8.0f} entries/s (median; baseline)")
    one = 0.0
    for procs, got in results.items():
        rates = [g.rate for g in got]
        cpu = statistics.median(g.cpu_ms for g in got)
        med = statistics.median(rates)
        one = one or med
        print(
            f"worker drain, {procs} process(es): {med:8.0f} jobs/s "
            f"(range {min(rates):.0f}-{max(rates):.0f}; ratio to baseline {med / floor:.3f}; "
            f"to 1 process {med / one:.2f}x; worker CPU {cpu:.0f} ms per 1000 jobs;"
            f" peak RSS {max(g.rss for g in got):.0f} MB)"
        )


if __name__ == "__main__":
    asyncio.run(main())
