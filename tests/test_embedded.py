"""The embedded servers: real PostgreSQL and Valkey processes in a temporary directory."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeout
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.devserver import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError, free_port
from tests.support.db import login_over_tcp

REPO = Path(__file__).resolve().parents[1]


def gone(pid: int) -> bool:
    """Exited (a zombie counts: an orphan's zombie may never be reaped in a container)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def fetch(url: str, sql: str) -> object:
    """Run *sql* on a fresh connection (the server may have restarted) and return one value."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def pg_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory whose cluster exists (initdb once per module) and is stopped."""
    data_dir = tmp_path_factory.mktemp("postgres")
    with EmbeddedPostgres(data_dir):
        pass
    yield data_dir


def start_and_die(cls: str, data_dir: Path) -> int:
    """Start a server in a child python that SIGKILLs itself; return the server's pid."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from app.devserver import {cls}
        server = {cls}(Path(sys.argv[1]))
        server.start()
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -9, result.stderr
    return int(result.stdout.strip())


# --- PostgreSQL ---


async def test_postgres_serves_the_conveyor_database_and_keeps_data_across_restart(
    pg_dir: Path,
) -> None:
    pg = EmbeddedPostgres(pg_dir)
    url = pg.start()
    try:
        password = quote(pg.password, safe="")
        assert url == f"postgresql+asyncpg://postgres:{password}@127.0.0.1:{pg.port}/conveyor"
        await fetch(url, "CREATE TABLE kept AS SELECT 42 AS v")
        first_pid, port = pg.pid, pg.port

        assert pg.restart() == url
        assert pg.port == port
        assert pg.pid != first_pid
        assert first_pid is not None and gone(first_pid)
        assert await fetch(url, "SELECT v FROM kept") == 42
        assert await fetch(url, "SELECT current_database()") == "conveyor"
    finally:
        pg.stop()


async def _assert_password_needed(pg: EmbeddedPostgres) -> None:
    """Over TCP, no password and a wrong one are refused; the one in the file is accepted."""
    for wrong in (None, "", "not-the-password"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await login_over_tcp(pg.port, wrong)
    assert pg.password_file.read_text().strip() == pg.password
    assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600
    assert await login_over_tcp(pg.port, pg.password) == "postgres"


async def test_postgres_tcp_needs_the_password_kept_in_a_private_file(pg_dir: Path) -> None:
    """On a shared host another local user can reach 127.0.0.1 but not read the 0600 file."""
    with EmbeddedPostgres(pg_dir) as pg:
        await _assert_password_needed(pg)
        assert "trust" not in _hba_rules(pg_dir, "host")
        socket_dir = Path(pg._socket_dir)
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700  # where `local` trust applies


def _hba_rules(pg_dir: Path, kind: str) -> str:
    lines = (pg_dir / "pgdata" / "pg_hba.conf").read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith(kind))


async def test_postgres_data_dir_of_an_older_version_gets_a_password(pg_dir: Path) -> None:
    """A cluster made when every connection was trusted, with no password file: the first
    start generates the password, sets it and closes TCP to anyone without it; data stays."""
    with EmbeddedPostgres(pg_dir) as pg:
        await fetch(pg.url, "CREATE TABLE IF NOT EXISTS older AS SELECT 7 AS v")
    hba = pg_dir / "pgdata" / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    (pg_dir / "password").unlink()
    with EmbeddedPostgres(pg_dir) as pg:
        await _assert_password_needed(pg)
        assert await fetch(pg.url, "SELECT v FROM older") == 7
    kept = (pg_dir / "password").read_text()
    with EmbeddedPostgres(pg_dir) as pg:  # the next start keeps the password
        assert pg.password_file.read_text() == kept
        assert await login_over_tcp(pg.port, pg.password) == "postgres"


def test_postgres_stop_leaves_no_process_and_is_idempotent(pg_dir: Path) -> None:
    pg = EmbeddedPostgres(pg_dir)
    pg.start()
    pid = pg.pid
    assert pid is not None and not gone(pid)
    backends = psutil.Process(pid).children()
    assert backends

    pg.stop()
    pg.stop()
    assert pg.pid is None
    assert gone(pid)
    assert all(gone(backend.pid) for backend in backends)
    assert not (pg_dir / "pgdata" / "postmaster.pid").exists()


def test_postgres_takes_its_previous_port_again(pg_dir: Path) -> None:
    with EmbeddedPostgres(pg_dir) as first:
        port = first.port
    with EmbeddedPostgres(pg_dir) as second:
        assert second.port == port


def test_postgres_stops_a_leftover_server_of_the_same_data_dir(pg_dir: Path) -> None:
    lost = EmbeddedPostgres(pg_dir)
    lost.start()
    lost_pid = lost.pid
    assert lost_pid is not None
    with EmbeddedPostgres(pg_dir) as fresh:
        assert gone(lost_pid)
        assert fresh.pid not in (None, lost_pid)
    lost.stop()


def test_postgres_dies_with_the_process_that_started_it(pg_dir: Path) -> None:
    pid = start_and_die("EmbeddedPostgres", pg_dir)
    assert wait_gone(pid), "the postgres server outlived its parent"


# --- Valkey ---


async def test_redis_answers_and_keeps_data_across_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        assert url == f"redis://127.0.0.1:{server.port}/0"
        client = aioredis.from_url(url)
        await client.set("kept", "yes")
        await client.aclose()
        port, first_pid = server.port, server.pid

        assert server.restart() == url
        assert (server.port, server.pid is not None) == (port, True)
        assert server.pid != first_pid
        client = aioredis.from_url(url)
        assert await client.get("kept") == b"yes"
        await client.aclose()
        assert (tmp_path / "appendonlydir").is_dir()
    finally:
        server.stop()


async def test_redis_without_persistence_forgets_on_restart(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, persistent=False) as server:
        client = aioredis.from_url(server.url)
        await client.set("lost", "soon")
        await client.aclose()
        server.restart()
        client = aioredis.from_url(server.url)
        assert await client.get("lost") is None
        await client.aclose()
    assert not (tmp_path / "appendonlydir").exists()


async def test_redis_pause_hangs_clients_until_resume(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, persistent=False) as server:
        server.pause()
        client = aioredis.from_url(server.url, socket_timeout=0.3)
        with pytest.raises(RedisTimeout):
            await client.ping()
        await client.aclose()
        server.resume()
        client = aioredis.from_url(server.url, socket_timeout=2)
        assert await client.ping()
        await client.aclose()


def test_redis_kill_stop_and_start_again(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, persistent=False)
    server.start()
    pid = server.pid
    assert pid is not None
    server.kill()
    assert gone(pid)
    assert server.pid is None
    server.start()
    restarted = server.pid
    assert restarted is not None
    server.pause()
    server.stop()  # a paused server still stops
    server.stop()
    assert gone(restarted)
    assert not (tmp_path / "valkey.pid").exists()


def test_redis_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    pid = start_and_die("EmbeddedRedis", tmp_path)
    assert wait_gone(pid), "the valkey server outlived its parent"
    with EmbeddedRedis(tmp_path) as again:  # the stale pidfile is no obstacle
        assert again.pid is not None


def test_redis_on_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        server = EmbeddedRedis(tmp_path, port=port)
        with pytest.raises(EmbeddedServerError, match=str(port)):
            server.start()
        assert server.pid is None


def test_redis_moves_off_a_remembered_port_that_is_taken(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, persistent=False) as first:
        port = first.port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with EmbeddedRedis(tmp_path, persistent=False) as second:
            assert second.port != port
