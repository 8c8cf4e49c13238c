"""The run: servers, a throwaway database, each system's workloads, repetitions, the report."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmark import infra, load
from benchmark.conveyor import Conveyor
from benchmark.peers import DramatiqPeer, Peer, PgQueuerPeer, TaskiqPeer, installed
from benchmark.report import CONVEYOR, Results

KNEE_MS = 100.0
REQUIRED_RATES = (200.0, 1000.0)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny numbers: checks that it runs")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of every figure")
    p.add_argument("--jobs", type=int, default=20000, help="jobs per drain")
    p.add_argument("--seconds", type=float, default=10, help="wrk duration")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument(
        "--concurrency", type=int, default=64, help="Conveyor worker --concurrency (latency)"
    )
    p.add_argument(
        "--drain-concurrency",
        type=int,
        default=1000,
        help="Conveyor worker --concurrency for the drains: a no-op backlog is best served by"
        " two full claims (500 a statement) in flight, as PgQueuer's by its batch of 100",
    )
    p.add_argument(
        "--rates", default="25,50,100,200,400,700,1000,1500,2000", help="open-loop steps"
    )
    p.add_argument("--step-seconds", type=float, default=3)
    p.add_argument("--processes", default="1,2", help="worker processes for the drains")
    p.add_argument("--systems", default="fastapi,conveyor,pgqueuer,taskiq,dramatiq")
    p.add_argument(
        "--log-level",
        default="WARNING",
        help="Conveyor's CONVEYOR_LOG_LEVEL (its own default is INFO: one line per transition)",
    )
    p.add_argument("--out", type=Path, default=infra.ROOT / "docs" / "bench")
    p.add_argument("--name", default="peers", help="file stem of the JSON and PNG")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead: one Conveyor repetition with py-spy flame graphs of the API under the "
        "single-POST load and of a worker during the drain, written to --out",
    )
    args = p.parse_args(argv)
    if args.profile:
        args.repeat, args.systems, args.name = 1, "conveyor", "profile"
        args.processes, args.rates = "1", "200"
    if args.smoke:
        args.repeat, args.jobs, args.seconds = 1, 300, 2
        args.rates, args.step_seconds, args.processes = "50", 1.0, "1"
        if args.name == "peers":
            args.name = "smoke"
    return args


class Run:
    def __init__(self, args: argparse.Namespace, server_url: str, redis_url: str) -> None:
        self.args = args
        self.server_url, self.redis_url = server_url, redis_url
        self.log_dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-logs-"))
        self.procs = infra.Processes(self.log_dir)
        self.databases: list[str] = []
        self.redis_patterns: list[str] = []
        self.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        self.processes = [int(x) for x in args.processes.split(",")]
        self.rates = sorted({float(x) for x in args.rates.split(",")} | self._required())
        self.results = Results(settings={k: str(v) for k, v in vars(args).items()})
        self.failures: list[str] = []

    def _required(self) -> set[float]:
        return set() if self.args.smoke or self.args.profile else set(REQUIRED_RATES)

    async def database(self, purpose: str) -> str:
        name = f"bench_{purpose}_{uuid.uuid4().hex[:8]}"
        await infra.create_database(self.server_url, name)
        self.databases.append(name)
        return infra.with_database(self.server_url, name)

    async def guarded(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run one system's share of a repetition; a failure is reported, not fatal."""
        try:
            await step()
        except Exception as exc:  # one broken system must not lose the others' figures
            self.failures.append(f"{what}: {exc!r}")
            print(f"!! {what} failed: {exc!r}", flush=True)
            traceback.print_exc()
        finally:
            self.procs.stop_all()

    # --- the systems ------------------------------------------------------------------

    async def fastapi(self, rep: int) -> None:
        from app.devserver import free_port

        port = free_port()
        env = infra.python_env()
        argv = [
            "-m",
            "benchmark.bare_app",
            "--port",
            str(port),
            "--workers",
            str(self.args.api_workers),
        ]
        proc = self.procs.python("fastapi", argv, env)
        url = f"http://127.0.0.1:{port}"
        await infra.wait_http(url, proc)
        cpu = infra.cpu_seconds(proc.pid)
        body = {"type": "demo.echo", "queue": "default", "payload": {}}
        r = await load.post_load(f"{url}/v1/jobs", body, self.args.seconds, self.args.connections)
        used = infra.cpu_seconds(proc.pid) - cpu
        accepted = r.requests - r.non2xx
        self._single_post("fastapi", r, used * 1000 / accepted if accepted else None)
        self.results.add("fastapi", "API RSS", "MB", max(infra.rss_mb(proc.pid)), higher=False)
        self.procs.stop(proc)

    def _single_post(self, system: str, r: load.WrkResult, cpu_ms: float | None) -> None:
        if not r.requests - r.non2xx:  # nothing answered in time: no latency figures
            r.p50_ms = r.p99_ms = math.inf
        metric = f"single POST, {self.args.connections} connections"
        self.results.add(system, f"{metric}: req/s", "req/s", r.rate)
        self.results.add(system, f"{metric}: p50", "ms", _finite(r.p50_ms), higher=False)
        self.results.add(system, f"{metric}: p99", "ms", _finite(r.p99_ms), higher=False)
        self.results.add(system, "API CPU per accepted POST", "ms", cpu_ms, higher=False)
        print(
            f"   {system}: {r.rate:,.0f} req/s p50 {r.p50_ms:.1f} ms p99 {r.p99_ms:.1f} ms "
            f"non-2xx {r.non2xx} errors {r.errors}; CPU {cpu_ms or math.nan:.2f} ms/req",
            flush=True,
        )

    async def conveyor(self, rep: int) -> None:
        from app.db.migrate import upgrade

        db = await self.database("conveyor")
        await asyncio.to_thread(upgrade, db)
        c = Conveyor(self.procs, db, self.redis_url, self.args.concurrency)
        c.log_level = self.args.log_level
        c.profile_dir = self.args.out if self.args.profile else None
        self.redis_patterns.append(f"{c.prefix}*")
        await c.start_api(self.args.api_workers)
        r, cpu_ms = await c.single_post(self.args.seconds, self.args.connections, f"post{rep}")
        self._single_post(CONVEYOR, r, cpu_ms)
        c.concurrency = self.args.drain_concurrency
        for n in self.processes:
            submitted, drained, rss = await c.drain(
                f"drain{n}-{rep}", self.args.jobs, n, self._timeout()
            )
            self._drain(CONVEYOR, n, drained, rss)
            if n == self.processes[0]:
                self.results.add(CONVEYOR, "batch submit (1000 per request)", "jobs/s", submitted)
                print(f"   conveyor batch submit {submitted:,.0f} jobs/s", flush=True)
        c.concurrency = self.args.concurrency
        queues = [f"lat{rep}-{i}" for i in range(len(self.rates))]
        c.start_workers(queues, 1)
        await c.ready(queues[:1])
        await self._steps(
            CONVEYOR, lambda i, rate: c.latency(queues[i], rate, self.args.step_seconds)
        )
        assert c.api
        self.results.add(CONVEYOR, "API RSS", "MB", max(infra.rss_mb(c.api.pid)), higher=False)

    def _drain(self, system: str, n: int, rate: float, rss: list[float]) -> None:
        label = "process" if n == 1 else "processes"
        self.results.add(system, f"drain no-op jobs, {n} worker {label}", "jobs/s", rate)
        if n == self.processes[0] and rss:
            self.results.add(system, "worker RSS after the drain", "MB", max(rss), higher=False)
        print(
            f"   {system}: drain x{n} {rate:,.0f} jobs/s"
            f" (RSS {', '.join(f'{x:.0f}' for x in rss)} MB)",
            flush=True,
        )

    def _timeout(self) -> float:
        return 60.0 if self.args.smoke else max(120.0, float(self.args.jobs) / 50)

    async def _steps(
        self, system: str, measure: Callable[[int, float], Awaitable[tuple[float, float, int]]]
    ) -> None:
        """Offered rates in ascending order (the required ones always).

        Stepping stops once p99 is over 100 ms at two rates in a row (one alone may be a
        worker's idle poll at a low rate, or noise); the knee is the highest rate within
        100 ms before that.
        """
        knee, over, passed = 0.0, 0, False
        for i, rate in enumerate(self.rates):
            if passed and rate not in self._required():
                continue
            p50, p99, sent = await measure(i, rate)
            self.results.point(system, rate, p50, p99)
            print(
                f"   {system}: {rate:,.0f}/s offered ({sent} sent)"
                f" p50 {p50:.1f} ms p99 {p99:.1f} ms",
                flush=True,
            )
            if rate in self._required() or self.args.smoke:
                self.results.add(system, f"submit→start at {rate:,.0f}/s: p50", "ms", p50, False)
                self.results.add(system, f"submit→start at {rate:,.0f}/s: p99", "ms", p99, False)
            over = 0 if p99 <= KNEE_MS else over + 1
            if not passed and not over:
                knee = rate
            passed = passed or over >= 2
        self.results.add(system, "knee: highest offered rate with p99 ≤ 100 ms", "jobs/s", knee)

    async def peer(self, peer: Peer, rep: int) -> None:
        await peer.setup()
        try:
            options = [100, 10] if isinstance(peer, PgQueuerPeer) else [0]
            if self.args.smoke:
                options = options[:1]
            for option in options:
                system = f"pgqueuer (batch {option})" if option else peer.name
                for n in self.processes if option != 10 else self.processes[:1]:
                    queued, drained, rss = await peer.drain(
                        self.args.jobs, n, option, self._timeout()
                    )
                    self._drain(system, n, drained, rss)
                    if n == self.processes[0] and option != 10:
                        how = peer.how_enqueued
                        metric = "batch submit (1000 per request)"
                        self.results.add(peer.name, metric, "jobs/s", queued)
                        self.results.figure(peer.name, metric, "jobs/s").note = how
                        print(f"   {peer.name}: enqueue {queued:,.0f} jobs/s ({how})", flush=True)
            peer.start(1, 10)
            await peer.ready()
            await self._steps(peer.name, lambda i, rate: peer.latency(rate, self.args.step_seconds))
        finally:
            await peer.teardown()

    async def repetition(self, rep: int) -> None:
        for system in self.systems:
            print(f"-- repetition {rep + 1}/{self.args.repeat}: {system}", flush=True)
            began = time.monotonic()
            if system == "fastapi":
                await self.guarded("fastapi", lambda: self.fastapi(rep))
            elif system == "conveyor":
                await self.guarded("conveyor", lambda: self.conveyor(rep))
            else:
                await self.run_peer(system, rep)
            print(f"   ({time.monotonic() - began:.0f} s)", flush=True)

    async def run_peer(self, system: str, rep: int) -> None:
        kinds: dict[str, tuple[str, type[Peer]]] = {
            "pgqueuer": ("pgqueuer", PgQueuerPeer),
            "taskiq": ("taskiq_redis", TaskiqPeer),
            "dramatiq": ("dramatiq", DramatiqPeer),
        }
        module, kind = kinds[system]
        if not installed(module):
            print(f"   {system}: not installed (pip install -e '.[bench]'), skipped", flush=True)
            return
        db = await self.database(system) if system == "pgqueuer" else self.server_url
        peer = kind(self.procs, db, self.redis_url)
        self.redis_patterns.append(f"{peer.tag}*")
        await self.guarded(system, lambda: self.peer(peer, rep))
        shutil.rmtree(peer.probe_dir, ignore_errors=True)

    async def cleanup(self) -> None:
        self.procs.stop_all()
        for name in self.databases:
            await infra.drop_database(self.server_url, name)
        for pattern in self.redis_patterns:
            await infra.delete_keys(self.redis_url, pattern)


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else x


async def main(args: argparse.Namespace) -> int:
    with infra.servers() as (server, redis_url):
        if not load.have_wrk():
            print("wrk not found: single-POST figures need it (apt-get install wrk)", flush=True)
        run = Run(args, server, redis_url)
        started = time.monotonic()
        try:
            for rep in range(args.repeat):
                await run.repetition(rep)
        finally:
            await run.cleanup()
    run.results.settings["out"] = os.path.relpath(args.out, infra.ROOT)
    run.results.settings["seconds_taken"] = f"{time.monotonic() - started:.0f}"
    run.results.settings["removed"] = {"databases": run.databases, "redis": run.redis_patterns}
    print()
    print(run.results.table())
    json_path, png_path = run.results.write(args.out, args.name)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else " (no matplotlib: no plot)"))
    if run.failures:
        print("failures:\n  " + "\n  ".join(run.failures))
        print(f"process logs: {run.log_dir}")
        return 1
    shutil.rmtree(run.log_dir, ignore_errors=True)
    return 0
