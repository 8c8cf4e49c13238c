"""The operator commands as a person uses them (issue 14, CLI): tables, progress bars on bulk
work (``dlq replay --all``, ``submit --count N --wait``) and ``conveyor top``, through the
installed console script against a real API and worker. Terminal runs go through a
pseudo-terminal, as in a shell."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.support.processes import Spawner
from tests.test_cli import CONVEYOR, ROOT, api_url, conveyor, out

__all__ = ["api_url"]  # the fixture, shared with tests/test_cli.py

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
WIDE = {"COLUMNS": "200"}  # rich's width when standard output is not a terminal


def conveyor_tty(*args: str, timeout: float = 120, **env: str) -> tuple[int, str]:
    """Run the console script in a pseudo-terminal (200 columns); its exit code and screen
    output, escape sequences removed."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    full.update(env, PYTHONPATH=str(ROOT), TERM="xterm-256color")
    full.pop("COLUMNS", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(
        [str(CONVEYOR), *args], stdin=slave, stdout=slave, stderr=slave, env=full, cwd=ROOT
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def wait_worker(url: str, name: str) -> None:
    """Until the worker is registered (on a busy machine its start can take a while)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        items = httpx.get(f"{url}/v1/workers", timeout=10).json()["items"]
        if any(w["name"] == name for w in items):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {name} never registered")


def wait_counts(url: str, queue: str, **want: int) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        items = httpx.get(f"{url}/v1/queues", timeout=10).json()["items"]
        stats = next((q for q in items if q["queue"] == queue), {})
        if stats and all(stats.get(k) == v for k, v in want.items()):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"queue {queue} never reached {want}: {stats}")


def test_tables_on_a_terminal_json_in_a_pipe(api_url: str, spawn: Spawner, queue: str) -> None:
    spawn.worker([queue], name=f"tables-{queue}")
    wait_worker(api_url, f"tables-{queue}")
    code, screen = conveyor_tty(
        "submit", "demo.echo", "--payload", '{"n": 7}', "--queue", queue, "--wait",
        CONVEYOR_URL=api_url,
    )  # fmt: skip
    assert code == 0, screen
    assert re.search(r"status\s+succeeded", screen), screen
    assert re.search(r'result\s+\{"n":7\}', screen), screen
    job_id = re.search(r"id\s+([0-9a-f-]{36})", screen)
    assert job_id is not None, screen

    code, screen = conveyor_tty("queues", CONVEYOR_URL=api_url)
    assert code == 0
    header = next(line for line in screen.splitlines() if "waiting" in line)
    assert all(c in header for c in ("queue", "scheduled", "retrying", "running", "dead"))
    assert any(queue in line for line in screen.splitlines())

    code, screen = conveyor_tty("workers", CONVEYOR_URL=api_url)
    assert code == 0 and f"tables-{queue}" in screen and "last seen" in screen

    piped = conveyor("status", job_id.group(1), CONVEYOR_URL=api_url)
    assert out(piped)["status"] == "succeeded"  # a pipe still gets the API's JSON
    forced = conveyor("status", job_id.group(1), "--output", "table", CONVEYOR_URL=api_url, **WIDE)
    assert forced.returncode == 0 and re.search(r"status\s+succeeded", forced.stdout)

    missing = conveyor("status", "no-such-id", "-o", "table", CONVEYOR_URL=api_url)
    assert missing.returncode == 1 and "422" in missing.stderr


def _dead_batch(url: str, queue: str, n: int, until: datetime) -> list[str]:
    """``n`` jobs that fail (one attempt each, so they go dead) until ``until``."""
    job = {
        "type": "demo.fail",
        "queue": queue,
        "max_attempts": 1,
        "payload": {"fail_until": until.isoformat(), "message": "not yet"},
    }
    answer = httpx.post(f"{url}/v1/jobs/batch", json={"jobs": [job] * n}, timeout=30)
    assert answer.status_code == 202, answer.text
    return [j["id"] for j in answer.json()["jobs"]]


def test_dlq_replay_all_shows_progress_and_the_jobs_succeed(
    api_url: str, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=16, name=f"replay-{queue}")
    wait_worker(api_url, f"replay-{queue}")
    until = datetime.now(UTC) + timedelta(seconds=6)
    ids = _dead_batch(api_url, queue, 30, until)
    wait_counts(api_url, queue, dead=30)
    listed = conveyor("dlq", "ls", "--queue", queue, "--limit", "5", "-o", "table",
                      CONVEYOR_URL=api_url, **WIDE)  # fmt: skip
    assert (
        listed.returncode == 0 and "not yet" in listed.stdout and "more: --cursor" in listed.stdout
    )
    while datetime.now(UTC) < until:  # from now on they succeed
        time.sleep(0.2)

    code, screen = conveyor_tty("dlq", "replay", "--all", "--queue", queue, CONVEYOR_URL=api_url)
    assert code == 0, screen
    assert re.search(r"replaying\s.*30/30\s+100%", screen), screen
    assert re.search(r"replayed\W+30", screen), screen
    wait_counts(api_url, queue, dead=0, waiting=0, running=0)
    for job_id in ids:
        job = httpx.get(f"{api_url}/v1/jobs/{job_id}", timeout=10).json()
        assert job["status"] == "succeeded" and len(job["errors"]) == 1

    again = conveyor("dlq", "replay", "--all", "--queue", queue, CONVEYOR_URL=api_url)
    assert again.returncode == 0 and out(again) == {"matched": 0, "replayed": 0}
    wrong = conveyor("dlq", "rm", "--all", CONVEYOR_URL=api_url)
    assert wrong.returncode == 2 and "--all goes with replay" in wrong.stderr


def test_submit_many_and_wait_with_progress(api_url: str, spawn: Spawner, queue: str) -> None:
    spawn.worker([queue], concurrency=16, name=f"many-{queue}")
    wait_worker(api_url, f"many-{queue}")
    code, screen = conveyor_tty(
        "submit", "demo.echo", "--queue", queue, "--count", "40", "--wait", CONVEYOR_URL=api_url
    )
    assert code == 0, screen
    assert re.search(r"submitting\s.*40/40\s+100%", screen), screen
    assert re.search(r"finishing\s.*40/40\s+100%", screen), screen
    assert re.search(r"succeeded\W+40", screen), screen

    piped = conveyor(
        "submit", "demo.fail", "--payload", '{"message": "no"}', "--queue", queue,
        "--count", "3", "--wait", CONVEYOR_URL=api_url,
    )  # fmt: skip
    assert piped.returncode == 1, "exit 1 when any ended dead"
    result = out(piped)
    assert result["submitted"] == 3 and result["dead"] == 3 and len(set(result["ids"])) == 3
    bad = conveyor("submit", "demo.echo", "--count", "0", CONVEYOR_URL=api_url)
    assert bad.returncode == 2 and "--count" in bad.stderr


def test_top_shows_counts_and_rates(api_url: str, spawn: Spawner, queue: str) -> None:
    spawn.worker([queue], concurrency=8, name=f"top-{queue}")
    wait_worker(api_url, f"top-{queue}")
    paused = f"{queue}-p"
    pause = httpx.post(f"{api_url}/v1/queues/{paused}/pause", headers={"X-Requested-With": "t"})
    assert pause.status_code == 200, pause.text
    for _ in range(3):
        held = httpx.post(f"{api_url}/v1/jobs", json={"type": "demo.echo", "queue": paused})
        assert held.status_code == 202, held.text
    stop = threading.Event()

    def produce() -> None:  # submissions all through top's two samples
        while not stop.is_set():
            httpx.post(f"{api_url}/v1/jobs", json={"type": "demo.echo", "queue": queue})
            time.sleep(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        time.sleep(1.0)
        result = conveyor("top", "--once", "--interval", "3", CONVEYOR_URL=api_url)
    finally:
        stop.set()
        producer.join()
    assert result.returncode == 0, result.stderr
    frame = out(result)
    assert frame["workers"] >= 1 and frame["interval"] >= 3
    rows = {row["queue"]: row for row in frame["queues"]}
    mine = rows[queue]
    assert mine["in/s"] > 1 and mine["done/s"] > 1, mine
    assert mine["jobs_submitted_total"] >= mine["jobs_succeeded_total"] > 0
    assert rows[paused]["paused"] is True and rows[paused]["waiting"] == 3

    code, screen = conveyor_tty("top", "--once", "--interval", "0", CONVEYOR_URL=api_url)
    assert code == 0, screen
    assert "conveyor top" in screen and "worker(s)" in screen
    assert re.search(rf"{re.escape(paused)}\W+paused\W+3\W", screen), screen
    header = next(line for line in screen.splitlines() if "done/s" in line)
    assert "in/s" in header and "waiting" in header
