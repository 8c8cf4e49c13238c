"""The ``conveyor`` console script: operator commands against a real API and worker, and migrate."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Backends
from tests.support.db import fetch, scratch_database
from tests.support.processes import Spawner
from tests.support.proxy import LoseFirstAnswer, read_message

ROOT = Path(__file__).resolve().parents[1]
CONVEYOR = Path(sys.executable).with_name("conveyor")


def conveyor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script with a clean ``CONVEYOR_*`` environment plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    full.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [str(CONVEYOR), *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def out(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


@pytest.fixture
def api_url(spawn: Spawner) -> str:
    _, url = spawn.api()
    return url


def wait_status(url: str, job_id: str, statuses: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {statuses}")


def test_console_script_is_installed() -> None:
    assert CONVEYOR.is_file(), f"{CONVEYOR} missing: install the package (pip install -e .)"
    result = conveyor("--help")
    assert result.returncode == 0
    for command in ("dev", "migrate", "api", "worker", "submit", "status", "queues", "dlq"):
        assert command in result.stdout


def test_submit_wait_status_and_workers(api_url: str, spawn: Spawner, queue: str) -> None:
    name = f"cli-{queue}"
    spawn.worker([queue], name=name)

    submitted = conveyor(
        "submit",
        "demo.echo",
        "--payload",
        '{"hello": "cli"}',
        "--queue",
        queue,
        "--wait",
        CONVEYOR_URL=api_url,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = out(submitted)
    assert job["status"] == "succeeded" and job["result"] == {"hello": "cli"}

    status = conveyor("status", job["id"], CONVEYOR_URL=api_url)
    assert status.returncode == 0
    assert out(status)["id"] == job["id"] and out(status)["status"] == "succeeded"

    workers = conveyor("workers", CONVEYOR_URL=api_url)
    assert workers.returncode == 0
    mine = [w for w in out(workers)["items"] if w["name"] == name]
    assert mine and mine[0]["queues"] == [queue]


def test_dead_job_in_queues_dlq_ls_replay_and_rm(api_url: str, spawn: Spawner, queue: str) -> None:
    spawn.worker([queue])
    failed = conveyor(
        "submit",
        "demo.fail",
        "--payload",
        '{"message": "cli boom"}',
        "--queue",
        queue,
        "--wait",
        CONVEYOR_URL=api_url,
    )
    assert failed.returncode == 1, "--wait exits 1 when the job ends dead"
    job = out(failed)
    assert job["status"] == "dead" and len(job["errors"]) == 3

    queues = conveyor("queues", CONVEYOR_URL=api_url)
    assert queues.returncode == 0
    [stats] = [q for q in out(queues)["items"] if q["queue"] == queue]
    assert stats["dead"] == 1 and stats["waiting"] == 0 and stats["running"] == 0

    listed = conveyor("dlq", "ls", "--queue", queue, CONVEYOR_URL=api_url)
    assert listed.returncode == 0
    [dead] = out(listed)["items"]
    assert dead["id"] == job["id"] and dead["errors"][-1]["error"] == "cli boom"

    replayed = conveyor("dlq", "replay", job["id"], CONVEYOR_URL=api_url)
    assert replayed.returncode == 0 and out(replayed) == {"replayed": 1}
    again = wait_status(api_url, job["id"], {"dead"})
    assert len(again["errors"]) == 6  # three more attempts, the history kept

    removed = conveyor("dlq", "rm", job["id"], CONVEYOR_URL=api_url)
    assert removed.returncode == 0
    assert out(conveyor("dlq", "ls", "--queue", queue, CONVEYOR_URL=api_url))["items"] == []
    assert out(conveyor("status", job["id"], CONVEYOR_URL=api_url))["status"] == "dead"


def test_queue_pause_and_resume(api_url: str, queue: str) -> None:
    paused = conveyor("queue", "pause", queue, CONVEYOR_URL=api_url)
    assert paused.returncode == 0 and out(paused) == {"queue": queue, "paused": True}
    [stats] = [
        q for q in out(conveyor("queues", CONVEYOR_URL=api_url))["items"] if q["queue"] == queue
    ]
    assert stats["paused"] is True
    resumed = conveyor("queue", "resume", queue, CONVEYOR_URL=api_url)
    assert resumed.returncode == 0 and out(resumed) == {"queue": queue, "paused": False}
    bad = conveyor("queue", "pause", "no spaces", CONVEYOR_URL=api_url)
    assert bad.returncode == 1 and out(bad)["error"] == "invalid"


def test_errors_exit_non_zero(api_url: str) -> None:
    missing = conveyor("status", str(uuid.uuid4()), CONVEYOR_URL=api_url)
    assert missing.returncode == 1 and out(missing)["error"] == "not_found"

    unknown = conveyor("submit", "no.such.type", CONVEYOR_URL=api_url)
    assert unknown.returncode == 1 and out(unknown)["error"] == "invalid"

    bad_json = conveyor("submit", "demo.echo", "--payload", "{nope", CONVEYOR_URL=api_url)
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr

    by_flag = conveyor("status", str(uuid.uuid4()), "--url", api_url)
    assert by_flag.returncode == 1 and out(by_flag)["error"] == "not_found"


def test_submit_whose_answer_is_lost_is_retried_with_the_same_key_and_makes_one_job(
    backends: Backends, api_url: str, queue: str
) -> None:
    """Issue 10 item 14: the answer to a submission is lost in transit (the connection is
    reset after the API committed the job). The CLI sends it again with the idempotency key it
    generated, and the API answers with that same job: one job, not two."""
    proxy = LoseFirstAnswer(int(api_url.rsplit(":", 1)[1]))
    with proxy.running() as url:
        result = conveyor("submit", "demo.echo", "--queue", queue, CONVEYOR_URL=url)
    assert proxy.lost == 1
    assert result.returncode == 0, result.stderr
    assert "retrying with the same key" in result.stderr
    job = out(result)
    assert job["idempotency_key"].startswith("cli-")
    rows = asyncio.run(_run(backends.database_url, f"SELECT id FROM jobs WHERE queue = '{queue}'"))
    assert [str(r[0]) for r in rows] == [job["id"]]


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return read_message(sock)


def test_api_keeps_idle_connections_open_longer_than_clients_do(spawn: Spawner) -> None:
    """Issue 10 item 14: a server that closes idle keep-alive connections after 5 s (uvicorn's
    default) races clients that reuse them until 5 s (httpx's default): the request sent as
    the server closes is reset. The API keeps them 75 s; the setting changes that."""
    _, url = spawn.api()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert b" 200 " in _get(sock)
        time.sleep(6.0)
        assert b" 200 " in _get(sock), "the idle connection was closed"
    _, short = spawn.api(CONVEYOR_KEEPALIVE_SECONDS="1")
    port = int(short.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert b" 200 " in _get(sock)
        time.sleep(2.5)
        assert sock.recv(65536) == b"", "the server kept the connection past its keep-alive"


# -- conveyor migrate ------------------------------------------------------------------------


async def _run(url: str, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await fetch(url, sql)]


@pytest.fixture
def empty_db(backends: Backends) -> Iterator[str]:
    with scratch_database(backends.database_url, "conveyor_cli") as url:
        yield url


def test_migrate_twice_is_a_no_op(empty_db: str) -> None:
    first = conveyor("migrate", CONVEYOR_DATABASE_URL=empty_db)
    assert first.returncode == 0, first.stderr
    assert "migrations applied" in first.stdout
    jobs = "SELECT 'jobs'::regclass::oid::int"
    version = "SELECT version_num FROM alembic_version"
    before = (asyncio.run(_run(empty_db, jobs)), asyncio.run(_run(empty_db, version)))
    assert len(before[1]) == 1

    second = conveyor("migrate", CONVEYOR_DATABASE_URL=empty_db)
    assert second.returncode == 0, second.stderr
    after = (asyncio.run(_run(empty_db, jobs)), asyncio.run(_run(empty_db, version)))
    assert after == before  # same table (not re-created), same revision
