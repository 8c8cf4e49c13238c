"""``conveyor dev``: the whole system in one process tree, with no outside services.

Order of things::

    lock DATA/conveyor-dev.pid      one instance per data directory
    EmbeddedPostgres(DATA/postgres)
    EmbeddedRedis(DATA/redis)       append-only file, fsynced every second
    conveyor migrate
    conveyor api, conveyor worker   children that die with us (PR_SET_PDEATHSIG)
    wait for GET /readyz == 200, print the URLs
    ... until SIGINT/SIGTERM/SIGHUP or a child exits ...
    SIGTERM the API and worker (SIGKILL after 35 s), stop Valkey, stop PostgreSQL

Every child runs in its own process group, so a Ctrl-C at the terminal reaches only this
process, which then stops the children in order. A second Ctrl-C skips the grace period.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import httpx
import platformdirs

from app.devserver.postgres import EmbeddedPostgres
from app.devserver.process import child_preexec
from app.devserver.server import EmbeddedServerError
from app.devserver.valkey import EmbeddedRedis
from app.settings import Settings

if TYPE_CHECKING:
    from signal import _HANDLER

READY_TIMEOUT = 60.0
MIGRATE_TIMEOUT = 300.0
CHILD_STOP_TIMEOUT = 35.0
_WATCH_SECONDS = 0.5
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_data_dir() -> Path:
    return platformdirs.user_data_path("conveyor") / "dev"


class _StopRequested(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt, so nothing swallows it)."""


class _Failed(Exception):
    """Conveyor could not start, or a part of it stopped on its own."""


def _say(message: str) -> None:
    print(f"conveyor dev: {message}", file=sys.stderr, flush=True)


def _lock_pidfile(path: Path) -> int | None:
    """Lock *path* and write our pid in it; ``None`` if a live instance holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        _say(
            f"another instance (pid {holder}) is using {path.parent}; "
            "stop it first, or pass another --data-dir"
        )
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


_WILDCARDS = frozenset({"0.0.0.0", "", "::"})  # noqa: S104


def allowed_hosts(host: str, settings: Settings) -> str:
    """``CONVEYOR_ALLOWED_HOSTS`` for the API of ``conveyor dev --host HOST``: as configured,
    else the local names plus HOST (for a wildcard bind, this machine's name)."""
    if "allowed_hosts" in settings.model_fields_set:
        return settings.allowed_hosts
    name = socket.gethostname() if host in _WILDCARDS else host
    bound = f"[{name}]" if ":" in name and not name.startswith("[") else name
    return f"{settings.allowed_hosts},{bound.lower()}"


def _display_host(host: str) -> str:
    """Where to reach a server bound to *host* from this machine, ready for a URL."""
    reachable = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return f"[{reachable}]" if ":" in reachable else reachable


class _Supervisor:
    """Starts everything, watches the children, and stops everything in order."""

    def __init__(self, host: str, port: int, data_dir: Path) -> None:
        self.host, self.port, self.data_dir = host, port, data_dir
        self.base_url = f"http://{_display_host(host)}:{port}"
        self.postgres = EmbeddedPostgres(data_dir / "postgres")
        self.redis = EmbeddedRedis(data_dir / "redis", persistent=True)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False  # the next stop signal only hurries
        self.hurry = False

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            return self._serve()
        except _StopRequested:
            return 0
        finally:
            self.stopping = True
            self._shutdown()
            _restore(previous)

    def _serve(self) -> int:
        try:
            self._start()
            self._print_banner()
            self._watch()
        except (_Failed, EmbeddedServerError) as exc:
            self.stopping = True
            _say(str(exc))
        return 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise _StopRequested
        if not self.hurry:
            _say("stopping now, without waiting for jobs in flight")
        self.hurry = True

    # --- start ---

    def _start(self) -> None:
        env = dict(os.environ)
        env["CONVEYOR_DATABASE_URL"] = self.postgres.start()
        env["CONVEYOR_REDIS_URL"] = self.redis.start()
        env["CONVEYOR_ALLOWED_HOSTS"] = allowed_hosts(self.host, Settings())
        env.setdefault("CONVEYOR_LOG_FORMAT", "console")  # readable lines on a terminal
        self._migrate(env)
        api = ["api", "--host", self.host, "--port", str(self.port)]
        self.children["API"] = self._spawn(api, env)
        self.children["worker"] = self._spawn(["worker"], env)
        self._wait_ready()

    def _migrate(self, env: dict[str, str]) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_preexec(signal.SIGTERM),
            process_group=0,
            timeout=MIGRATE_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise _Failed(f"migrations failed (exit code {result.returncode})")

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "app.cli", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_preexec(signal.SIGTERM),
            process_group=0,
        )

    def _wait_ready(self) -> None:
        url = f"{self.base_url}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                time.sleep(0.25)
        raise _Failed(f"{url} did not answer 200 within {READY_TIMEOUT:.0f}s")

    def _print_banner(self) -> None:
        print(
            "Conveyor is running.\n"
            f"  API:       {self.base_url}\n"
            f"  Docs:      {self.base_url}/docs\n"
            f"  Dashboard: {self.base_url}/ui\n"
            f"  Data:      {self.data_dir}\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )

    # --- run ---

    def _watch(self) -> NoReturn:
        """Return only by raising: a stop signal or a part that stopped."""
        while True:
            self._check_alive()
            time.sleep(_WATCH_SECONDS)

    def _check_alive(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise _Failed(f"the {name} exited with code {proc.returncode}; stopping")
        for server in (self.postgres, self.redis):
            if not server.is_running():
                raise _Failed(f"{server.name} exited (see {server.log_path}); stopping")

    # --- stop ---

    def _shutdown(self) -> None:
        self._stop_children()
        for server in (self.redis, self.postgres):
            try:
                server.stop()
            except (OSError, EmbeddedServerError) as exc:
                _say(f"could not stop {server.name}: {exc}")

    def _stop_children(self) -> None:
        running = [proc for proc in self.children.values() if proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT
        while not self.hurry and time.monotonic() < deadline:
            if all(proc.poll() is not None for proc in running):
                return
            time.sleep(0.1)
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _restore(previous: dict[signal.Signals, _HANDLER]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_dev(host: str, port: int, data_dir: Path | None) -> int:
    """Run ``conveyor dev`` until a stop signal; 0 then, 1 if anything failed."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pidfile = data_dir / "conveyor-dev.pid"
    lock = _lock_pidfile(pidfile)
    if lock is None:
        return 1
    try:
        return _Supervisor(host, port, data_dir).run()
    finally:
        pidfile.unlink(missing_ok=True)
        os.close(lock)
