"""``conveyor dev``: from an empty data directory to a finished job, then stopped without a trace.

Each test runs the real command in a subprocess, with its embedded PostgreSQL and Valkey, and
checks by pid (psutil) that every process it started is gone afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest

from app.devserver import free_port
from tests.support.db import login_over_tcp

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180.0  # initdb and the first start share a loaded 2-core machine
STOP_TIMEOUT = 90.0


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: an orphan's zombie may never be reaped in a container)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _read_pid(path: Path) -> int:
    return int(path.read_text().split("\n", 1)[0].strip())


class Dev:
    """One ``conveyor dev`` process on ``data_dir``, its output in a log file."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["PYTHONPATH"] = str(ROOT)
        argv = [sys.executable, "-m", "app.cli", "dev", "--port", str(self.port)]
        argv += ["--data-dir", str(data_dir)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.family: dict[str, int] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> str:
        """Wait for the banner; record the pids of everything it started; return the output."""
        deadline = time.monotonic() + START_TIMEOUT
        while "Press Ctrl-C to stop" not in self.output():
            assert self.proc.poll() is None, f"conveyor dev exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"no banner in {START_TIMEOUT}s:\n{self.output()}"
            time.sleep(0.2)
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.family = {f"child {c.pid}": int(c.pid) for c in children}
        self.family["postgres"] = _read_pid(
            self.data_dir / "postgres" / "pgdata" / "postmaster.pid"
        )
        self.family["valkey"] = _read_pid(self.data_dir / "redis" / "valkey.pid")
        child_pids = {int(c.pid) for c in children}
        assert self.family["postgres"] in child_pids and self.family["valkey"] in child_pids
        return self.output()

    def assert_nothing_left(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        left = dict(self.family)
        while left and time.monotonic() < deadline:
            left = {name: pid for name, pid in left.items() if not _gone(pid)}
            time.sleep(0.2)
        assert not left, f"still running after {timeout}s: {left}\n{self.output()}"

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C or a service manager would; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _submit_and_finish(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        response = client.post("/v1/jobs", json={"type": "demo.echo", "payload": payload})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in {"succeeded", "dead", "cancelled"}:
                return job
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within 60s")


def _get_job(url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def _assert_postgres_needs_the_password(pg_dir: Path) -> None:
    """The dev database over TCP: refused without the password, accepted with the one kept in
    the data directory (readable by its owner only)."""
    port = int((pg_dir / "postgres.port").read_text())
    password_file = pg_dir / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(login_over_tcp(port, None))
    assert asyncio.run(login_over_tcp(port, password_file.read_text().strip())) == "postgres"


def test_dev_runs_a_job_then_sigterm_stops_everything_and_restart_keeps_it(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    assert not data_dir.exists()
    dev = Dev(data_dir, tmp_path / "dev-1.log")
    try:
        banner = dev.wait_started()
        assert re.search(rf"Docs:\s+{re.escape(dev.url)}/docs", banner), banner
        assert f"{dev.url}/ui" in banner
        assert httpx.get(f"{dev.url}/readyz", trust_env=False).status_code == 200
        assert httpx.get(f"{dev.url}/docs", trust_env=False).status_code == 200
        job = _submit_and_finish(dev.url, {"hello": "dev"})
        assert job["status"] == "succeeded" and job["result"] == {"hello": "dev"}
        _assert_postgres_needs_the_password(data_dir / "postgres")

        assert dev.stop() == 0
        dev.assert_nothing_left()
        assert not (data_dir / "conveyor-dev.pid").exists()
    finally:
        dev.kill()

    again = Dev(data_dir, tmp_path / "dev-2.log")
    try:
        again.wait_started()
        kept = _get_job(again.url, job["id"])
        assert kept["status"] == "succeeded" and kept["result"] == {"hello": "dev"}
        assert again.stop() == 0
        again.assert_nothing_left()
    finally:
        again.kill()


def test_dev_killed_outright_leaves_no_orphans_and_starts_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    dev = Dev(data_dir, tmp_path / "dev-1.log")
    try:
        dev.wait_started()
        job = _submit_and_finish(dev.url, {"n": 1})
        assert job["status"] == "succeeded"
    finally:
        dev.kill()  # SIGKILL: no chance to clean up; the children must die with it
    dev.assert_nothing_left()

    again = Dev(data_dir, tmp_path / "dev-2.log")
    try:
        again.wait_started()
        assert httpx.get(f"{again.url}/readyz", trust_env=False).status_code == 200
        assert _get_job(again.url, job["id"])["status"] == "succeeded"
        assert again.stop() == 0
        again.assert_nothing_left()
    finally:
        again.kill()
