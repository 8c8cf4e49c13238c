"""A real PgBouncer in transaction pooling mode, started by a test in a directory of its own,
on a free port, in front of the test's Postgres (ADR 0020)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from app.devserver import free_port

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer", path=SEARCH_PATH)


def psql_binary() -> str | None:
    return shutil.which("psql", path=SEARCH_PATH)


class PgBouncer:
    """``pool_mode = transaction`` in front of the server of ``database_url``.

    Every database name is passed on (``* = host=… port=…``); the database ``narrow`` (the
    same one as ``database_url``) has a pool of two server connections, so that many clients
    surely take turns on them. Clients are trusted; PgBouncer logs in to Postgres as the
    client's user with the password of ``database_url`` (if any).
    """

    def __init__(self, database_url: str, *, pool_size: int = 20) -> None:
        self.upstream = make_url(database_url)
        self.pool_size = pool_size
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="conveyor-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str | None = None) -> str:
        """``database_url`` with the host and port of this PgBouncer."""
        url = self.upstream.set(host="127.0.0.1", port=self.port)
        if database is not None:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    def _config(self) -> str:
        up = self.upstream
        target = f"host={up.host or '127.0.0.1'} port={up.port or 5432}"
        return f"""\
[databases]
narrow = {target} dbname={up.database} pool_size=2
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "userlist.txt"}
admin_users = {up.username}
stats_users = {up.username}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 1000
server_reset_query =
; What Conveyor never sends behind a pooler but other clients (psql, JDBC) commonly do.
ignore_startup_parameters = extra_float_digits
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
"""

    def start(self, timeout: float = 15) -> None:
        binary = pgbouncer_binary()
        assert binary, "pgbouncer is not installed"
        user, password = self.upstream.username or "postgres", self.upstream.password or ""
        (self.dir / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        config = self.dir / "pgbouncer.ini"
        config.write_text(self._config())
        argv = [binary, str(config)]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            account = pwd.getpwnam("postgres")
            shutil.chown(self.dir, account.pw_uid, account.pw_gid)
            for path in self.dir.iterdir():
                shutil.chown(path, account.pw_uid, account.pw_gid)
            argv = [binary, "-u", "postgres", str(config)]
        out = (self.dir / "stdout.log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}:\n{self.output()}")

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console."""
        lines = self.admin(f"SHOW {what}").splitlines()
        header = lines[0].split(",")
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]

    def admin(self, command: str) -> str:
        """A command on the admin console (simple query protocol only, hence psql), as CSV."""
        psql = psql_binary()
        assert psql, "psql is not installed"
        env = dict(os.environ)
        if self.upstream.password:
            env["PGPASSWORD"] = self.upstream.password
        argv = [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U"]
        argv += [self.upstream.username or "postgres", "-d", "pgbouncer", "--csv", "-c"]
        done = subprocess.run([*argv, command], env=env, capture_output=True, check=True)
        return done.stdout.decode()

    def output(self) -> str:
        parts = [self.dir / "stdout.log", self.dir / "pgbouncer.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
