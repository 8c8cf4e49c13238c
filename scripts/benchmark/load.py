"""HTTP load: closed-loop with wrk (64 connections) and an open-loop submitter at a fixed rate.

The open-loop submitters run in the harness's own process, so a pause of that process is
counted as the system's latency. Two kept out of the figures, for every system alike:

- the cyclic garbage collector: the harness imports every peer's library, and a full
  collection of that heap stalled the submitter for 50 to 100 ms once a step at 1,000/s (every
  request due meanwhile went out late, about 1% of the step, so it set the p99); during a
  measured window the collector is off and the start-up heap frozen (:func:`steady_heap`);
- the first requests of a step: callers run a short warm-up at the step's rate first
  (``WARMUP_SECONDS``) and measure after it, so each step reports the steady state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %%d, \\"seconds\\": %%f, \\"p50_ms\\": %%f, \\"p99_ms\\": %%f,"
    .. " \\"errors\\": %%d, \\"non2xx\\": %%d}\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


# The warm-up before each measured open-loop step (new connections, the first statements of
# a queue): its jobs run but are not counted.
WARMUP_SECONDS = 0.5


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """No cyclic garbage collection in this process while the block runs (a bounded window:
    rate * seconds requests), with what was allocated before it frozen out of later passes."""
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.unfreeze()


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    non2xx: int

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.non2xx) / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_post(url: str, body: Mapping[str, object], seconds: float, connections: int) -> WrkResult:
    """POST ``body`` over ``connections`` keep-alive connections for ``seconds`` (2 threads)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_SCRIPT % json.dumps(json.dumps(body)))
        script = f.name
    try:
        argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
        out = subprocess.run(
            [*argv, "-s", script, url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        Path(script).unlink()
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    return WrkResult(**json.loads(line.removeprefix("WRKJSON ")))


@dataclass
class Sent:
    scheduled: float  # wall-clock time the request was due (also carried in the body)
    status: int  # 0 when the connection failed or the run ended first
    written: float = 0.0  # when its bytes went to the socket: written - scheduled is our lag


class _Pool:
    """Keep-alive HTTP/1.1 connections to one server, opened on demand up to ``limit``."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        self.idle = asyncio.Queue()
        self.opened = 0

    async def acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle.empty() and self.opened < self.limit:
            self.opened += 1
            try:
                return await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.opened -= 1
                raise
        return await self.idle.get()

    def release(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.idle.put_nowait(conn)

    def discard(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.opened -= 1
        conn[1].close()

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()[1].close()


async def _post(pool: _Pool, path: str, body: bytes, sent: Sent | None = None) -> int:
    conn = await pool.acquire()
    reader, writer = conn
    try:
        if sent is not None:
            sent.written = time.time()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {pool.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        pool.discard(conn)
        return 0
    except BaseException:
        pool.discard(conn)
        raise
    pool.release(conn)
    return status


async def _paced(
    one: Callable[[float], Coroutine[Any, Any, None]], rate: float, seconds: float
) -> list[asyncio.Task[None]]:
    """Start ``one(due)`` at each due time, ``rate`` per second for ``seconds``, whatever the
    earlier ones take (open loop); the tasks, still running."""
    tasks: list[asyncio.Task[None]] = []
    start = time.time() + 0.05
    for i in range(max(1, int(rate * seconds))):
        due = start + i / rate
        if (delay := due - time.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    return tasks


async def open_loop(
    host: str,
    port: int,
    path: str,
    body: Callable[[float], bytes],
    rate: float,
    seconds: float,
    connections: int = 256,
    grace: float = 10,
) -> list[Sent]:
    """POST ``body(due)`` at ``rate`` per second for ``seconds``, whatever the answers take.

    Requests still unanswered ``grace`` seconds after the last one was due are abandoned
    (status 0): the server could not keep up.
    """
    pool = _Pool(host, port, connections)
    sent: list[Sent] = []

    async def one(due: float) -> None:
        s = Sent(due, 0)
        sent.append(s)
        s.status = await _post(pool, path, body(due), s)

    with steady_heap():
        tasks = await _paced(one, rate, seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), grace)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pool.close()
    return sent


async def open_loop_calls(
    call: Callable[[float], Awaitable[object]], rate: float, seconds: float, concurrency: int = 256
) -> int:
    """Call the async ``call(due)`` at ``rate`` per second for ``seconds``; returns calls made."""
    gate = asyncio.Semaphore(concurrency)

    async def one(due: float) -> None:
        async with gate:
            await call(due)

    with steady_heap():
        tasks = await _paced(one, rate, seconds)
        await asyncio.gather(*tasks)
    return len(tasks)


async def closed_loop(
    host: str, port: int, path: str, body: bytes, seconds: float, connections: int
) -> WrkResult:
    """wrk's loop in Python (used when wrk is missing): each connection POSTs back to back."""
    pool = _Pool(host, port, connections)
    latencies: list[float] = []
    statuses: list[int] = []
    end = time.perf_counter() + seconds

    async def client() -> None:
        while (t := time.perf_counter()) < end:
            statuses.append(await _post(pool, path, body))
            latencies.append((time.perf_counter() - t) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    pool.close()
    ordered = sorted(latencies) or [math.nan]
    return WrkResult(
        requests=sum(1 for s in statuses if s),
        seconds=elapsed,
        p50_ms=ordered[len(ordered) // 2],
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        errors=sum(1 for s in statuses if not s),
        non2xx=sum(1 for s in statuses if s and not 200 <= s < 300),
    )


async def post_load(
    url: str, body: Mapping[str, object], seconds: float, connections: int
) -> WrkResult:
    """Closed-loop POSTs at ``connections`` connections: wrk when installed, else Python."""
    if have_wrk():
        return await asyncio.to_thread(wrk_post, url, body, seconds, connections)
    parsed = urlsplit(url)
    assert parsed.hostname and parsed.port
    return await closed_loop(
        parsed.hostname, parsed.port, parsed.path, json.dumps(body).encode(), seconds, connections
    )
