"""A PostgreSQL primary and its streaming replica, both started by a test on loopback ports
from the Debian server binaries (``/usr/lib/postgresql/*/bin``), in a directory of their own:
never the shared server. Used to promote the replica while jobs flow (a failover)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.devserver import free_port

NEEDED = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
_CONFIG = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 4
hot_standby = on
fsync = off
full_page_writes = on
shared_buffers = 32MB
max_connections = 200
log_min_messages = warning
"""


def server_binaries() -> Path | None:
    """The newest Debian PostgreSQL server's bin directory that has every binary needed."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if all((Path(found) / name).exists() for name in NEEDED):
            return Path(found)
    return None


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


@dataclass
class _Account:
    uid: int | None
    gid: int | None


def _account() -> _Account:
    """PostgreSQL refuses to run as root: then run it as ``postgres`` (the Debian package's)."""
    if os.geteuid() != 0:
        return _Account(None, None)
    entry = pwd.getpwnam("postgres")
    return _Account(entry.pw_uid, entry.pw_gid)


class Server:
    """One server: its data directory, port, log; started and stopped with ``pg_ctl``."""

    def __init__(self, bindir: Path, root: Path, name: str, account: _Account) -> None:
        self.bindir = bindir
        self.data = root / name
        self.log = root / f"{name}.log"
        self.sockets = root
        self.port = free_port()
        self.account = account

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / name), *args],
            user=self.account.uid,
            group=self.account.gid,
            cwd=self.sockets,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets}"
        done = self.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
            "-t", "60", "start", check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{self.data.name} did not start: {done.stderr}\n{self.output()}")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def promote(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Replicated:
    """A primary (``initdb``) and, once :meth:`add_replica` is called, a streaming replica
    made with ``pg_basebackup -R`` (asynchronous replication)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.account = _account()
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-failover-"))
        if self.account.uid is not None:
            shutil.chown(self.root, self.account.uid, self.account.gid)
        self.primary = Server(bindir, self.root, "primary", self.account)
        self.replica = Server(bindir, self.root, "replica", self.account)

    def start_primary(self) -> None:
        p = self.primary
        p.run("initdb", "-D", str(p.data), "-U", "postgres", "-A", "trust", "-N", "-E", "UTF8")
        with (p.data / "postgresql.conf").open("a") as conf:
            conf.write(_CONFIG)
        p.start()

    def add_replica(self) -> None:
        p, r = self.primary, self.replica
        r.run(
            "pg_basebackup", "-D", str(r.data), "-h", "127.0.0.1", "-p", str(p.port),
            "-U", "postgres", "-X", "stream", "-R", "-c", "fast", "-N",
        )  # fmt: skip
        r.start()

    def stop(self) -> None:
        for server in (self.replica, self.primary):
            if server.data.exists():
                server.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
