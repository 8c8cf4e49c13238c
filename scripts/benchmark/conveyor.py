"""Conveyor under load, through its public surface only: the CLI, the HTTP API and its listing.

Start times are the jobs' ``started_at`` (set by the claim in Postgres), finish times their
``finished_at``; submit times travel in the payload (``{"t": wall-clock seconds}``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmark import infra, load
from benchmark.stats import percentile

INF = float("inf")


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


@dataclass
class Conveyor:
    procs: infra.Processes
    database_url: str
    redis_url: str
    concurrency: int
    prefix: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}")
    api: subprocess.Popen[bytes] | None = None
    port: int = 0
    profile_dir: Path | None = None  # py-spy flame graphs of the API and a worker under load
    log_level: str = "WARNING"  # of the API and the workers (Conveyor's own default: INFO)

    @property
    def env(self) -> dict[str, str]:
        return infra.python_env(
            CONVEYOR_DATABASE_URL=self.database_url,
            CONVEYOR_REDIS_URL=self.redis_url,
            CONVEYOR_REDIS_PREFIX=self.prefix,
            CONVEYOR_LOG_LEVEL=self.log_level,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start_api(self, workers: int) -> None:
        from app.devserver import free_port

        self.port = free_port()
        self.api = self.procs.python(
            "conveyor-api",
            ["-m", "app.cli", "api", "--port", str(self.port), "--workers", str(workers)],
            self.env,
        )
        await infra.wait_http(self.url, self.api)

    def stop_api(self) -> None:
        if self.api:
            self.procs.stop(self.api)
            self.api = None

    def start_workers(self, queues: list[str], processes: int) -> list[subprocess.Popen[bytes]]:
        """``conveyor worker --processes N`` when the CLI has it, else N worker processes."""
        base = ["-m", "app.cli", "worker", "--queues", ",".join(queues)]
        base += ["--concurrency", str(self.concurrency)]
        if processes > 1 and _has_processes_flag():
            return [
                self.procs.python(
                    "conveyor-worker", [*base, "--processes", str(processes)], self.env
                )
            ]
        return [
            self.procs.python(
                f"conveyor-worker-{i}", [*base, "--name", f"bench-{uuid.uuid4().hex[:6]}"], self.env
            )
            for i in range(processes)
        ]

    async def submit_one(self, client: httpx.AsyncClient, queue: str) -> str:
        r = await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})
        r.raise_for_status()
        job_id: str = r.json()["id"]
        return job_id

    async def ready(self, queues: list[str], timeout: float = 60) -> None:
        """Wait until a job on each of ``queues`` has run: the workers are up and reading."""
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            ids = [await self.submit_one(client, q) for q in queues]
            deadline = time.monotonic() + timeout
            for job_id in ids:
                while (await client.get(f"/v1/jobs/{job_id}")).json()["status"] != "succeeded":
                    if time.monotonic() > deadline:
                        raise RuntimeError("Conveyor workers did not run a job in time")
                    await asyncio.sleep(0.1)

    async def single_post(
        self, seconds: float, connections: int, queue: str
    ) -> tuple[load.WrkResult, float | None]:
        """wrk POST /v1/jobs; also the API's CPU milliseconds per accepted submission."""
        assert self.api
        cpu = infra.cpu_seconds(self.api.pid)
        body = {"type": "demo.echo", "queue": queue, "payload": {}}
        spy = self._profile("api-single-post", self.api.pid, seconds - 1)
        result = await load.post_load(f"{self.url}/v1/jobs", body, seconds, connections)
        used = infra.cpu_seconds(self.api.pid) - cpu
        await self._finish(spy)
        accepted = result.requests - result.non2xx
        return result, (used * 1000 / accepted if accepted else None)

    async def batch_submit(self, queue: str, n: int) -> float:
        """Jobs per second through POST /v1/jobs/batch, 1000 per request."""
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            start = time.perf_counter()
            done = 0
            while done < n:
                size = min(1000, n - done)
                body = {
                    "jobs": [
                        {"type": "demo.echo", "queue": queue, "payload": {"i": done + i}}
                        for i in range(size)
                    ]
                }
                r = await client.post("/v1/jobs/batch", json=body)
                if r.status_code != 202:
                    raise RuntimeError(f"batch submit answered {r.status_code}: {r.text[:300]}")
                done += size
            return n / (time.perf_counter() - start)

    async def wait_drained(self, queue: str, timeout: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                counts = {q["queue"]: q for q in (await client.get("/v1/queues")).json()["items"]}
                q = counts.get(queue, {})
                if not any(q.get(k, 0) for k in ("waiting", "running", "retrying", "scheduled")):
                    return
                await asyncio.sleep(0.25)
        raise RuntimeError(f"queue {queue} did not drain within {timeout} s")

    async def wait_started(self, queue: str, n: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while True:
                counts = {q["queue"]: q for q in (await client.get("/v1/queues")).json()["items"]}
                if counts.get(queue, {}).get("waiting", n) < n:
                    return
                await asyncio.sleep(0.1)

    async def jobs(self, queue: str) -> list[dict[str, Any]]:
        """Every job of ``queue``, through the listing (500 a page)."""
        items: list[dict[str, Any]] = []
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            cursor: str | None = None
            while True:
                params = {"queue": queue, "limit": "500", **({"cursor": cursor} if cursor else {})}
                page = (await client.get("/v1/jobs", params=params)).json()
                items.extend(page["items"])
                if not (cursor := page.get("next_cursor")):
                    return items

    async def drain(
        self, queue: str, n: int, processes: int, timeout: float
    ) -> tuple[float, float, list[float]]:
        """Batch-submit n jobs with no worker reading, then drain them with ``processes``.

        The workers run one job first and stop: their first start records the Redis data
        epoch of the queue, which a later first start would take for a data loss and re-send
        the whole backlog. Returns (submit jobs/s, drain jobs/s, worker RSS MB).
        """
        workers = self.start_workers([queue], processes)
        await self.ready([queue])
        for w in workers:
            self.procs.stop(w)
        submitted = await self.batch_submit(queue, n)
        workers = self.start_workers([queue], processes)
        spy = None
        if self.profile_dir and processes == 1:
            await self.wait_started(queue, n)  # past the imports: profile the drain itself
            spy = self._profile("worker-drain", workers[0].pid, 10)
        await self.wait_drained(queue, timeout)
        await self._finish(spy)
        rss = [mb for w in workers for mb in infra.rss_mb(w.pid)]
        for w in workers:
            self.procs.stop(w)
        jobs = [j for j in await self.jobs(queue) if j["payload"]]  # not the warm-up job
        starts = [t for j in jobs if (t := _ts(j["started_at"]))]
        ends = [t for j in jobs if (t := _ts(j["finished_at"]))]
        span = max(ends) - min(starts)
        return submitted, len(jobs) / span, rss

    def _profile(self, name: str, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
        if not self.profile_dir:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{name}.svg"
        argv = [infra.py_spy(), "record", "--nonblocking", "--subprocesses", "-r", "100"]
        argv += ["-d", str(max(1, int(seconds))), "-o", str(out), "--pid", str(pid)]
        return self.procs.start(f"py-spy-{name}", argv, infra.python_env())

    async def _finish(self, spy: subprocess.Popen[bytes] | None) -> None:
        """Wait for py-spy to write its flame graph."""
        if spy:
            await asyncio.to_thread(spy.wait, 60)
            self.procs.running.remove(spy)

    async def latency(self, queue: str, rate: float, seconds: float) -> tuple[float, float, int]:
        """Open-loop single POSTs at ``rate``; submit→start p50, p99 (ms) and the jobs sent.

        A job that was not accepted or had not started 10 s after the last was due counts as
        infinitely late, so p99 is infinite when more than 1% did not make it.
        """
        assert self.api

        def body(due: float) -> bytes:
            return json.dumps({"type": "demo.echo", "queue": queue, "payload": {"t": due}}).encode()

        async def started(sent: list[load.Sent]) -> dict[float, float]:
            """When each job of ``sent`` started, once all accepted ones have (or 10 s on)."""
            wanted = {round(s.scheduled, 6) for s in sent if s.status == 202}
            deadline = time.monotonic() + 10
            while True:
                times = {
                    t: start
                    for j in await self.jobs(queue)
                    if j["started_at"]
                    and "t" in j["payload"]
                    and (t := round(j["payload"]["t"], 6)) in wanted
                    and (start := _ts(j["started_at"]))
                }
                if len(times) >= len(wanted) or time.monotonic() > deadline:
                    return times
                await asyncio.sleep(0.5)

        port, path = self.port, "/v1/jobs"
        await started(
            await load.open_loop("127.0.0.1", port, path, body, rate, load.WARMUP_SECONDS)
        )
        sent = await load.open_loop("127.0.0.1", port, path, body, rate, seconds)
        times = await started(sent)
        lat = [((times.get(round(s.scheduled, 6)) or INF) - s.scheduled) * 1000 for s in sent]
        return percentile(lat, 50), percentile(lat, 99), len(sent)


_flag: bool | None = None


def _has_processes_flag() -> bool:
    global _flag
    if _flag is None:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker", "--help"],
            cwd=infra.ROOT,
            env=infra.python_env(),
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        _flag = "--processes" in out
    return _flag
