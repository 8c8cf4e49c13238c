#!/usr/bin/env python
"""Submit-path benchmark: ``POST /v1/jobs`` and ``POST /v1/jobs/batch`` against a real
``conveyor api``, beside a bare FastAPI POST endpoint served the same way, in one run.

    .venv/bin/python scripts/bench_submit.py [--processes 1,2] [--duration 10]
        [--connections 64] [--profile DIR] [--worker] [--before CHECKOUT]

For each process count: starts ``conveyor api --workers N`` (a throwaway database on the
Postgres server of ``CONVEYOR_TEST_DATABASE_URL``, a unique Redis key prefix on
``CONVEYOR_TEST_REDIS_URL``) and ``uvicorn`` serving a bare FastAPI app with the same worker
count, and drives both with ``wrk -t2 -cC -dDs`` POSTing one ``demo.echo`` job per request.
Prints req/s, p50/p99, the ratio to the bare endpoint, the CPU time per request of the API
processes and of the Postgres backends serving its database, and batch submit (1000 jobs per
request, 4 connections) in jobs/s (CPU then per job). ``--before CHECKOUT`` measures another
checkout's API in each round too (``git archive <commit> | tar -x -C DIR``), for a before and
after from one run. ``--profile DIR`` records a py-spy profile (collapsed stacks, for
flamegraph.pl or speedscope) of each one-process API under the single-POST load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade
from app.devserver.process import free_port

SINGLE = {"type": "demo.echo", "payload": {"hello": "world", "n": 1}}
BATCH_SIZE = 1000
PYSPY = str(Path(sys.executable).with_name("py-spy"))

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d,' ..
    ' "p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# -- the bare baseline --------------------------------------------------------------------------


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    payload: dict[str, Any] = {}


def bare_app() -> FastAPI:
    """A FastAPI POST endpoint that validates a small body and answers 202: the floor."""
    app = FastAPI()

    @app.post("/v1/jobs", status_code=202)
    async def submit(item: _Item) -> dict[str, Any]:
        return {"id": str(uuid.uuid4()), "type": item.type, "status": "queued"}

    return app


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    database: str | None = None  # whose Postgres backends count as this server's

    def workers(self) -> list[psutil.Process]:
        """The processes that serve requests (uvicorn's children, or itself with one)."""
        parent = psutil.Process(self.proc.pid)
        children = parent.children(recursive=True)
        served = [c for c in children if "multiprocessing.resource_tracker" not in c.cmdline()]
        return served or [parent]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.workers():
            times = p.cpu_times()
            total += times.user + times.system
        return total

    def postgres_cpu_seconds(self) -> float:
        """CPU of the Postgres backends serving this server's database (0 for none)."""
        total = 0.0
        for p in psutil.process_iter(["cmdline", "cpu_times"]):
            cmdline = p.info["cmdline"] or []
            if self.database and cmdline and f" {self.database} " in f" {cmdline[0]} ":
                total += p.info["cpu_times"].user + p.info["cpu_times"].system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_up(proc: subprocess.Popen[bytes], url: str, path: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode})")
        try:
            if httpx.get(url + path, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not come up")


def start_conveyor(
    env: dict[str, str], processes: int, log: Path, database: str, root: Path = ROOT
) -> Server:
    """``conveyor api`` from the checkout at ``root`` (another one: see ``--before``)."""
    port = free_port()
    argv = [sys.executable, "-m", "app.cli", "api", "--port", str(port)]
    argv += ["--workers", str(processes)]
    env = {**env, "PYTHONPATH": str(root)}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_up(proc, url, "/readyz")
    return Server(proc, url, database)


def start_bare(processes: int, log: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench_submit:bare_app", "--factory"]
    argv += ["--app-dir", str(ROOT / "scripts"), "--port", str(port), "--workers", str(processes)]
    argv += ["--no-access-log", "--log-level", "warning"]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_up(proc, url, "/docs")
    return Server(proc, url)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "app.cli", "worker", "--concurrency", "64"]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non2xx: int
    cpu_ms: float  # API CPU per request (per job for batches)
    pg_ms: float  # Postgres backend CPU per request (per job for batches)
    single: bool = False  # a single-POST run: its ratio to the bare endpoint is printed

    def row(self, baseline: Result | None) -> str:
        ratio = f"{self.rps / baseline.rps:5.2f}" if baseline else "    -"
        return (
            f"{self.name:<34} {self.rps:9.0f} {self.p50_ms:8.1f} {self.p99_ms:8.1f}"
            f" {ratio} {self.cpu_ms:6.2f} {self.pg_ms:6.2f} {self.errors:6d} {self.non2xx:6d}"
        )


HEADER = (
    f"{'run':<34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>5} {'cpu ms':>6}"
    f" {'pg ms':>6} {'errors':>6} {'non2xx':>6}"
)


def wrk(url: str, body: bytes, connections: int, seconds: int, workdir: Path) -> dict[str, Any]:
    script = workdir / f"wrk-{uuid.uuid4().hex[:6]}.lua"
    script.write_text(WRK_SCRIPT % json.dumps(body.decode()))
    argv = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def drive(
    name: str,
    server: Server,
    path: str,
    body: bytes,
    args: argparse.Namespace,
    *,
    connections: int | None = None,
    per_request: int = 1,
) -> Result:
    """wrk against one endpoint; rates and CPU are per job (``per_request`` jobs a request)."""
    cpu0, pg0 = server.cpu_seconds(), server.postgres_cpu_seconds()
    r = wrk(server.url + path, body, connections or args.connections, args.duration, args.workdir)
    cpu, pg = server.cpu_seconds() - cpu0, server.postgres_cpu_seconds() - pg0
    jobs = max(r["requests"] * per_request, 1)
    return Result(
        name=name,
        rps=jobs / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=r["errors"],
        non2xx=r["non2xx"],
        cpu_ms=1000 * cpu / jobs,
        pg_ms=1000 * pg / jobs,
    )


def batch_rate(server: Server, args: argparse.Namespace) -> Result:
    body = json.dumps({"jobs": [SINGLE] * BATCH_SIZE}).encode()
    name = "  batch (1000/request, 4 conns) jobs/s"
    return drive(name, server, "/v1/jobs/batch", body, args, connections=4, per_request=BATCH_SIZE)


def profile(server: Server, args: argparse.Namespace, label: str) -> None:
    """py-spy the one API process while wrk loads it: an SVG and the collapsed stacks."""
    [proc] = server.workers()
    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    seconds = str(max(args.duration - 2, 3))
    common = ["record", "--pid", str(proc.pid), "-r", "100", "-d", seconds]
    spies = [subprocess.Popen([PYSPY, *common, "-f", "raw", "-o", str(out / f"{label}.txt")])]
    time.sleep(0.5)
    wrk(
        server.url + "/v1/jobs",
        json.dumps(SINGLE).encode(),
        args.connections,
        int(seconds) + 1,
        args.workdir,
    )
    for spy in spies:
        spy.wait(60)
    print(f"profile (collapsed stacks) written to {out}/{label}.txt")


# -- main ---------------------------------------------------------------------------------------


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _database(server_url: str, name: str, create: bool) -> int:
    conn = await asyncpg.connect(_dsn(server_url))
    try:
        if create:
            await conn.execute(f'CREATE DATABASE "{name}"')
            return 0
        db_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        other = await asyncpg.connect(_dsn(db_url))
        try:
            count: int = await other.fetchval("SELECT count(*) FROM jobs")
        finally:
            await other.close()
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        return count
    finally:
        await conn.close()


def conveyor_env(database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_DATABASE_URL=database_url,
        CONVEYOR_REDIS_URL=redis_url,
        CONVEYOR_REDIS_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        PYTHONPATH=str(ROOT),
    )
    return env


def run_round(processes: int, env: dict[str, str], args: argparse.Namespace) -> list[Result]:
    """The bare endpoint, then this checkout's API (and the ``--before`` one's, if given)."""
    bare = start_bare(processes, args.workdir / "bare.log")
    try:
        name = f"bare FastAPI POST, {processes} proc"
        results = [drive(name, bare, "/v1/jobs", json.dumps(SINGLE).encode(), args)]
    finally:
        bare.stop()
    checkouts = [("conveyor", ROOT)] + ([("before", args.before)] if args.before else [])
    for label, root in checkouts:
        results += measure_conveyor(label, root, processes, env, args)
    return results


def measure_conveyor(
    label: str, root: Path, processes: int, env: dict[str, str], args: argparse.Namespace
) -> list[Result]:
    body = json.dumps(SINGLE).encode()
    api = start_conveyor(env, processes, args.workdir / f"{label}.log", args.database, root)
    try:
        short = argparse.Namespace(**{**vars(args), "duration": 2})
        drive("  warm-up", api, "/v1/jobs", body, short)
        name = f"{label} POST /v1/jobs, {processes} proc"
        results = [drive(name, api, "/v1/jobs", body, args), batch_rate(api, args)]
        results[0].single = True
        if args.profile and processes == 1:
            profile(api, args, label)
    finally:
        api.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help="run one worker meanwhile")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout (e.g. `git archive` of an older commit) measured in each round too",
    )
    args = parser.parse_args()
    server_url = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if not (server_url and redis_url):
        raise SystemExit("set CONVEYOR_TEST_DATABASE_URL and CONVEYOR_TEST_REDIS_URL")
    name = args.database = f"conveyor_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_database(server_url, name, create=True))
    database_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    worker: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        args.workdir = Path(tmp)
        try:
            upgrade(database_url)
            env = conveyor_env(database_url, redis_url)
            if args.worker:
                worker = start_worker(env, args.workdir / "worker.log")
            print(HEADER)
            for processes in [int(p) for p in args.processes.split(",")]:
                results = run_round(processes, env, args)
                for r in results:
                    print(r.row(results[0] if r.single else None), flush=True)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(40)
            jobs = asyncio.run(_database(server_url, name, create=False))
            print(f"jobs written: {jobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
