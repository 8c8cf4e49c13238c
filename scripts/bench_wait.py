#!/usr/bin/env python
"""Waiting for a job over HTTP: ``GET /v1/jobs/{id}?wait=S`` against real processes.

    .venv/bin/python scripts/bench_wait.py [--jobs 200] [--repeat 3] [--api-workers 2] \
        [--nap 1.0] [--direct] [--smoke] [--json FILE]

Starts ``conveyor api`` (uvicorn, ``--workers N``) and one ``conveyor worker --concurrency
256`` with ``CONVEYOR_HANDLER_MODULES=tests.support.handlers``, on a throwaway database and a
unique Redis prefix made from CONVEYOR_TEST_DATABASE_URL / CONVEYOR_TEST_REDIS_URL (both
removed afterwards). Each round, from this process (256 keep-alive connections): one
``POST /v1/jobs/batch`` of N ``test.nap`` jobs (``{"seconds": 1.0}``), then at once N
concurrent ``GET /v1/jobs/{id}?wait=30``. A first round of the same size warms up the
processes and the connections and is not reported. Printed, over all reported rounds:

- submission → answer: from just before the batch POST to each GET's answer;
- the baseline, which no wait can beat: submission → the job's own ``finished_at`` (set by
  Postgres in the worker's completion statement), and the ratio of the two;
- lateness: ``finished_at`` → answer (the completion's commit, the Redis pub/sub message,
  the grouped read and the HTTP answer);
- the statements the API ran on Postgres while the requests waited.

How the statements are counted: the API (and only the API: the worker and this script go
to Postgres directly) reaches Postgres through a loopback relay in this process that reads
the client side of the wire protocol and counts what it carries: each Execute message (the
extended protocol: every ORM and asyncpg statement, SELECT or otherwise) and, apart, each
simple Query (the ORM's BEGIN, COMMIT and ROLLBACK around them). That is exactly what the
API's connections asked Postgres to run, whichever of its pools or uvicorn processes sent
it. "While waiting" is from the batch's answer to the last GET's answer. The API's idle
rate (its alerts, layout and re-check loops) is measured before the rounds for comparison.
Polling per request would cost at least one statement per request per poll (200 requests
for 1 s at a 0.2 s poll: ~1,000); waiters woken by one notification share a few grouped
reads. The relay adds one loopback hop to each of the API's statements, so the latencies,
if anything, err on the slow side (``--direct`` connects the API straight to Postgres, with
no counts, to see that cost). ``--smoke``: 10 jobs of 0.2 s, one round, one API process.

Not used: ``pg_stat_statements`` (it is not in ``shared_preload_libraries`` on a stock
server, and needs a restart to be), ``pg_stat_database`` (per database, so the worker's
claims and completions are mixed in, and its counters are flushed about once a second, too
coarse for a one-second window), and sampling ``pg_stat_activity`` by ``application_name``
(it shows what runs at the moment of the sample, so short statements would be missed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark import infra, load
from benchmark.conveyor import Conveyor
from benchmark.stats import percentile

QUEUE = "bench-wait"
HANDLERS = "tests.support.handlers"
WAIT_SECONDS = 30
BAR_SLACK = 0.2  # issue 13: every answer within 1.2 s of submission, for 1 s jobs
CONNECTIONS = 256
SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class Relay:
    """A TCP relay between the API and Postgres that counts the statements it carries.

    It runs its own event loop in a thread, so the load this process makes does not delay
    the API's statements. Only the client → server direction is parsed; the answers pass
    through as they come.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.executes = 0  # extended protocol Execute messages
        self.queries = 0  # simple Query messages (BEGIN, COMMIT, resets, ...)
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def counts(self) -> tuple[int, int]:
        return self.executes, self.queries

    def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        )
        self._server = future.result(10)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        back = asyncio.create_task(_pipe(server_r, client_w))
        try:
            while True:  # start-up: refuse TLS/GSS here (loopback), forward the rest
                head = await client_r.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await client_r.readexactly(length - 8)
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    client_w.write(b"N")
                    await client_w.drain()
                    continue
                server_w.write(head + body)
                break
            while True:
                kind = await client_r.readexactly(1)
                size = await client_r.readexactly(4)
                body = await client_r.readexactly(struct.unpack("!i", size)[0] - 4)
                if kind == b"E":
                    self.executes += 1
                elif kind == b"Q":
                    self.queries += 1
                server_w.write(kind + size + body)
                await server_w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            server_w.close()
            back.cancel()
            client_w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class Client:
    """A bare HTTP/1.1 client over the keep-alive pool of the open-loop load
    (:mod:`benchmark.load`): one request at a time on each of up to ``size`` connections,
    JSON bodies with a Content-Length (all the API sends here).

    Not httpx: with 200 requests at once on one ``httpx.AsyncClient`` (httpx 0.28, httpcore
    1.0), its connection pool took 3 to 30 s to get 200 ``GET /healthz`` through that raw
    connections got through in 0.1 to 0.2 s against the same server (encode/httpx#3215 is
    the known issue), which would have swamped the figure measured here.
    """

    def __init__(self, host: str, port: int, size: int) -> None:
        self.pool = load._Pool(host, port, size)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body); raises on a broken connection or after the time-out."""
        data = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.pool.host}:{self.pool.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        conn = await self.pool.acquire()
        reader, writer = conn
        try:
            async with asyncio.timeout(WAIT_SECONDS + 30):
                writer.write(head.encode() + data)
                await writer.drain()
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in map(_split, lines[1:])}
                payload = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            self.pool.discard(conn)
            raise
        self.pool.release(conn)
        return int(lines[0].split()[1]), json.loads(payload) if payload else None

    def close(self) -> None:
        self.pool.close()


def _split(line: str) -> tuple[str, str, str]:
    return line.partition(":")


class WaitConveyor(Conveyor):
    """Conveyor with the test handlers, the API's database connections through the relay."""

    api_database_url: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "CONVEYOR_HANDLER_MODULES": HANDLERS}

    async def start_api(self, workers: int) -> None:
        direct, self.database_url = self.database_url, self.api_database_url
        try:
            await super().start_api(workers)
        finally:
            self.database_url = direct


@dataclass
class Round:
    latency: list[float] = field(default_factory=list)  # submission → answer, s
    baseline: list[float] = field(default_factory=list)  # submission → finished_at, s
    late: list[float] = field(default_factory=list)  # finished_at → answer, s
    start: list[float] = field(default_factory=list)  # submission → started_at, s
    run: list[float] = field(default_factory=list)  # started_at → finished_at, s
    not_finished: int = 0  # answers with the job not yet terminal
    submit_seconds: float = 0.0  # the batch POST itself
    waiting_seconds: float = 0.0  # the batch's answer → the last GET's answer
    statements_waiting: int = 0  # the API's executed statements in that window
    control_waiting: int = 0  # ... and its simple queries (BEGIN, COMMIT, ROLLBACK)
    statements_round: int = 0  # executed statements from before the batch POST to the end


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


async def one_round(client: Client, relay: Relay, jobs: int, nap: float) -> Round:
    body = {
        "jobs": [{"type": "test.nap", "queue": QUEUE, "payload": {"seconds": nap}}] * jobs,
    }
    r = Round()
    before = relay.counts()
    t0 = time.time()
    status, batch = await client.request("POST", "/v1/jobs/batch", body)
    if status != 202:
        raise RuntimeError(f"batch submit answered {status}: {str(batch)[:300]}")
    submitted = time.time()
    at_submit = relay.counts()
    ids = [job["id"] for job in batch["jobs"]]

    async def wait(job_id: str) -> tuple[float, dict[str, Any]]:
        status, job = await client.request("GET", f"/v1/jobs/{job_id}?wait={WAIT_SECONDS}")
        if status != 200:
            raise RuntimeError(f"GET ?wait= answered {status}: {str(job)[:300]}")
        return time.time(), job

    answers = await asyncio.gather(*(wait(job_id) for job_id in ids))
    last = max(at for at, _ in answers)
    after = relay.counts()
    r.submit_seconds = submitted - t0
    r.waiting_seconds = last - submitted
    r.statements_waiting = after[0] - at_submit[0]
    r.control_waiting = after[1] - at_submit[1]
    r.statements_round = after[0] - before[0]
    for at, job in answers:
        finished = _ts(job.get("finished_at"))
        r.latency.append(at - t0)
        if job["status"] != "succeeded" or finished is None:
            r.not_finished += 1
            continue
        r.baseline.append(finished - t0)
        r.late.append(at - finished)
        started = _ts(job.get("started_at"))
        if started is not None:
            r.start.append(started - t0)
            r.run.append(finished - started)
    return r


async def idle_rate(relay: Relay, seconds: float) -> float:
    """The API's statements per second with no request at all (its background loops)."""
    before = sum(relay.counts())
    await asyncio.sleep(seconds)
    return (sum(relay.counts()) - before) / seconds


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(list(values), 50) * 1000, 1),
        "p99": round(percentile(list(values), 99) * 1000, 1),
        "max": round(max(values) * 1000, 1),
    }


def summarize(rounds: list[Round], idle: float | None, args: argparse.Namespace) -> dict[str, Any]:
    latency = [x for r in rounds for x in r.latency]
    baseline = [x for r in rounds for x in r.baseline]
    late = [x for r in rounds for x in r.late]
    start = [x for r in rounds for x in r.start]
    run = [x for r in rounds for x in r.run]
    lat, base = _ms(latency), _ms(baseline)
    return {
        "jobs": args.jobs,
        "repeat": args.repeat,
        "api_workers": args.api_workers,
        "nap_seconds": args.nap,
        "answers": len(latency),
        "not_finished": sum(r.not_finished for r in rounds),
        "latency_ms": lat,
        "baseline_ms": base,
        "ratio": {k: round(lat[k] / base[k], 3) if base[k] else None for k in lat},
        "late_ms": _ms(late) if late else None,
        "start_ms": _ms(start) if start else None,
        "run_ms": _ms(run) if run else None,
        "within_bar": max(latency) <= args.nap + BAR_SLACK,
        "counted": not args.direct,
        "statements_waiting": [r.statements_waiting for r in rounds],
        "control_waiting": [r.control_waiting for r in rounds],
        "statements_round": [r.statements_round for r in rounds],
        "waiting_seconds": [round(r.waiting_seconds, 3) for r in rounds],
        "submit_ms": [round(r.submit_seconds * 1000, 1) for r in rounds],
        "idle_statements_per_s": None if idle is None else round(idle, 2),
        "rounds": [asdict(r) for r in rounds],
    }


def report(f: dict[str, Any]) -> None:
    print(
        f"\n{f['jobs']} test.nap jobs of {f['nap_seconds']} s, {f['jobs']} concurrent"
        f" GET ?wait={WAIT_SECONDS}, conveyor api --workers {f['api_workers']},"
        f" 1 worker --concurrency 256; {f['repeat']} round(s), {f['answers']} answers"
    )
    print("| ms | p50 | p99 | max |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("submission → answer (?wait=)", f["latency_ms"]),
        ("submission → finished_at (baseline)", f["baseline_ms"]),
        ("ratio", f["ratio"]),
        ("finished_at → answer (lateness)", f["late_ms"]),
        ("submission → started_at", f.get("start_ms")),
        ("started_at → finished_at", f.get("run_ms")),
    ]
    for name, values in rows:
        if values:
            print(f"| {name} | {values['p50']} | {values['p99']} | {values['max']} |")
    bar = f["nap_seconds"] + BAR_SLACK
    print(
        f"all answered within {bar:.2f} s of submission: {'yes' if f['within_bar'] else 'NO'};"
        f" answers with the job not finished: {f['not_finished']}"
    )
    waits = f["statements_waiting"]
    if not f["counted"]:
        print("API statements: not counted (--direct: the API connects to Postgres directly)")
        return
    print(
        f"API statements while {f['jobs']} requests waited, per round:"
        f" {', '.join(map(str, waits))} executed ({max(waits) / f['jobs']:.3f} per request at"
        f" most) + {', '.join(map(str, f['control_waiting']))} BEGIN/COMMIT/ROLLBACK, over"
        f" {', '.join(f'{s:.2f}' for s in f['waiting_seconds'])} s"
    )
    print(
        f"executed with the batch submit too: {', '.join(map(str, f['statements_round']))};"
        f" idle API (all messages): {f['idle_statements_per_s']} statements/s"
    )


async def bench(args: argparse.Namespace, server: str, redis_url: str) -> dict[str, Any]:
    from app.db.migrate import upgrade

    name = f"conveyor_bench_wait_{uuid.uuid4().hex[:8]}"
    await infra.create_database(server, name)
    db = infra.with_database(server, name)
    url = make_url(db)
    relay = Relay(url.host or "127.0.0.1", url.port or 5432)
    log_dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-wait-"))
    procs = infra.Processes(log_dir)
    c = WaitConveyor(procs, db, redis_url, concurrency=256)
    try:
        await asyncio.to_thread(upgrade, db)
        port = relay.start()
        relayed = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
        c.api_database_url = db if args.direct else relayed
        c.start_workers([QUEUE], 1)
        await c.start_api(args.api_workers)
        await c.ready([QUEUE])
        client = Client("127.0.0.1", c.port, CONNECTIONS)
        try:
            await one_round(client, relay, args.jobs, args.nap)  # warm-up, not reported
            idle = None if args.direct else await idle_rate(relay, args.idle_seconds)
            rounds = []
            for i in range(args.repeat):
                r = await one_round(client, relay, args.jobs, args.nap)
                rounds.append(r)
                print(
                    f"  round {i + 1}: p50 {percentile(r.latency, 50) * 1000:.0f} ms,"
                    f" max {max(r.latency) * 1000:.0f} ms; baseline p50"
                    f" {percentile(r.baseline, 50) * 1000:.0f} ms; API statements while"
                    f" waiting {r.statements_waiting} (+ {r.control_waiting} BEGIN/COMMIT)",
                    flush=True,
                )
        finally:
            client.close()
        figures = summarize(rounds, idle, args)
    except Exception:
        print(f"process logs: {log_dir}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        relay.stop()
        await infra.drop_database(server, name)
        await infra.delete_keys(redis_url, f"{c.prefix}*")
    shutil.rmtree(log_dir, ignore_errors=True)
    figures["database"] = name
    figures["redis_prefix"] = c.prefix
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs and concurrent waits a round")
    parser.add_argument("--repeat", type=int, default=3, help="reported rounds")
    parser.add_argument("--api-workers", type=int, default=2, help="conveyor api --workers")
    parser.add_argument("--nap", type=float, default=1.0, help="seconds each job sleeps")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument(
        "--direct",
        action="store_true",
        help="the API connects to Postgres directly: no statement counts (the relay's cost)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny numbers, for the tests")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.jobs <= 1000:
        parser.error("--jobs: 1 to 1000 (one batch)")
    if args.smoke:
        args.jobs, args.repeat, args.api_workers, args.nap, args.idle_seconds = 10, 1, 1, 0.2, 0.5
    server = os.environ.get(
        "CONVEYOR_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    figures = asyncio.run(bench(args, server, redis_url))
    report(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
