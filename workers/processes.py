"""``--processes N``: N worker processes under one parent, to use every core.

The parent runs no jobs. It starts the children (``python -m workers``, each with the same
queues and ``--concurrency``, and a name of its own), forwards SIGTERM and SIGINT to them, and
exits 0 once all of them have exited. A child that exits while no stop was asked for is
started again after a pause, unless it was refused at start (a bad argument, or its name is
held by a live worker): that would fail again, so the parent stops the others and exits with
the child's code. Children run in their own process group, so a terminal's Ctrl-C
reaches them once (through the parent), not twice (a second signal means "hand back now"),
and on Linux they get SIGTERM if the parent dies.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from workers import shutdown

log = logging.getLogger(__name__)

RESTART_PAUSE = 1.0
POLL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1
# A child that exits with one of these was refused at start: starting it again cannot help.
FATAL_EXITS = frozenset({shutdown.EXIT_USAGE, shutdown.EXIT_NAME_IN_USE})


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def set_pdeathsig() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_pdeathsig


class Processes:
    def __init__(
        self,
        queues: list[str],
        concurrency: int,
        names: list[str | None],
        metrics_port: int | None = None,
    ) -> None:
        self.queues = queues
        self.metrics_port = metrics_port
        self.concurrency = concurrency
        self.names = names
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.exit_code = shutdown.EXIT_OK

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "workers", "--queues", ",".join(self.queues)]
        argv += ["--concurrency", str(self.concurrency)]
        name = self.names[i]
        if name is not None:
            argv += ["--name", name]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port + i)]
        # Our own interpreter and arguments, no shell.
        return subprocess.Popen(argv, process_group=0, preexec_fn=_die_with_parent())  # noqa: S603

    def _forward(self, sig: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(sig)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for i in range(len(self.names)):
            self.children[i] = self._spawn(i)
        log.info("started %d worker processes", len(self.children))
        restart_at: dict[int, float] = {}
        while self.children:
            for i, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                if self.stopping:
                    del self.children[i]
                    continue
                if code in FATAL_EXITS:
                    log.error(
                        "worker process %d was refused at start (%s); stopping", child.pid, code
                    )
                    del self.children[i]
                    self.exit_code = code
                    self._forward(signal.SIGTERM, None)
                    continue
                if i not in restart_at:
                    log.warning("worker process %d exited (%s); starting it again", child.pid, code)
                    restart_at[i] = time.monotonic() + RESTART_PAUSE
                elif time.monotonic() >= restart_at.pop(i):
                    self.children[i] = self._spawn(i)
            time.sleep(POLL_SECONDS)
        log.info("all worker processes exited")
        return self.exit_code


def child_names(name: str | None, processes: int) -> list[str | None]:
    """``NAME-1`` … ``NAME-N`` when a name is given; else each child makes its own."""
    if name is None:
        return [None] * processes
    return [f"{name}-{i + 1}" for i in range(processes)]
