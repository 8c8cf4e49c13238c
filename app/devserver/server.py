"""The lifecycle every embedded server shares: start, stop, restart, reap a leftover.

Each server writes its log into its data directory and, unless given a port, takes the port of
its previous run when that is free, so URLs stay the same between runs. A server left over by
an earlier run of the same data directory is stopped on start.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from app.devserver.process import (
    POLL_SECONDS,
    Liveness,
    RunAs,
    child_preexec,
    end_stale,
    free_port,
    liveness,
    log_since,
    port_is_free,
    read_int,
    stop_child,
)

log = logging.getLogger(__name__)

_ADDRESS_IN_USE = "Address already in use"


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop; the message carries its log's tail."""


class PortInUse(EmbeddedServerError):
    """Another process holds the port the server was to listen on."""


class EmbeddedServer(ABC):
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
            stop_child(proc, self.stop_signal, self.stop_timeout)
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

    def _run_as(self) -> RunAs | None:
        return None

    @property
    def _death_signal(self) -> signal.Signals:
        return self.stop_signal

    # --- steps ---

    @property
    def _port_file(self) -> Path:
        return self.data_dir / f"{self.name}.port"

    def _reap_stale(self) -> None:
        pid = read_int(self._pidfile)
        if pid is None:
            return
        state = liveness(pid, self.process_name, self._workdir)
        if state is Liveness.OURS:
            log.warning("stopping %s pid %d, left over from an earlier run", self.name, pid)
            end_stale(pid, self.stop_signal, self.stop_timeout)
        if state is not Liveness.UNKNOWN:
            self._pidfile.unlink(missing_ok=True)

    def _launch(self) -> None:
        """Spawn on the known port, else on the remembered one, else on any free port."""
        if self._port is not None:
            self._spawn_and_wait(self._port)
            return
        remembered = read_int(self._port_file)
        candidates = [remembered] if remembered is not None else []
        for port in [*candidates, free_port(), free_port()]:
            try:
                self._spawn_and_wait(port)
            except PortInUse:
                log.info("%s: port %d is taken, trying another", self.name, port)
                continue
            self._port = port
            self._port_file.write_text(f"{port}\n")
            return
        raise EmbeddedServerError(f"{self.name}: found no free port")

    def _spawn_and_wait(self, port: int) -> None:
        if not port_is_free(port):
            raise PortInUse(f"{self.name}: port {port} is in use")
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
            time.sleep(POLL_SECONDS)

    def _startup_error(self, what: str, offset: int) -> EmbeddedServerError:
        tail = log_since(self.log_path, offset)
        error = PortInUse if _ADDRESS_IN_USE in tail else EmbeddedServerError
        return error(f"{self.name} {what}; the end of {self.log_path}:\n{tail}")
