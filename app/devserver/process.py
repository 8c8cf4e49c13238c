"""Processes of the embedded servers: free ports, death signals, reaping and stopping.

A server runs as a direct child in its own process group. The kernel signals it when we die,
even by SIGKILL (``PR_SET_PDEATHSIG``, see :func:`child_preexec`); the signal follows the
*thread* that started the child, so start servers from a thread that outlives them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RunAs:
    """The user and group a child runs as (``None`` in its place: as ourselves)."""

    uid: int
    gid: int


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
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


class Liveness(Enum):
    GONE = "gone"
    OURS = "ours"  # a live server of this kind working in this directory
    OTHER = "other"  # the pid now belongs to an unrelated process
    UNKNOWN = "unknown"  # not ours to inspect


def liveness(pid: int, name: str, workdir: Path) -> Liveness:
    if _is_gone(pid):
        return Liveness.GONE
    try:
        proc = psutil.Process(pid)
        ours = str(proc.name()).startswith(name) and Path(proc.cwd()) == workdir
    except psutil.NoSuchProcess:
        return Liveness.GONE
    except psutil.AccessDenied:
        return Liveness.UNKNOWN
    return Liveness.OURS if ours else Liveness.OTHER


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to *timeout* until each pid is gone; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not _is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        alive = [pid for pid in alive if not _is_gone(pid)]
    return alive


def kill_tree(pid: int) -> list[int]:
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


def end_stale(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Stop a server that is not our child: *sig*, and SIGKILL if it outlives *timeout*."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)
    if wait_gone([pid], timeout):
        log.warning("pid %d ignored %s for %.0fs; killing it", pid, sig.name, timeout)
        wait_gone(kill_tree(pid), 5.0)


def stop_child(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Stop our child with *sig* (waking it if paused); SIGKILL its tree after *timeout*."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored %s for %.0fs; killing it", proc.pid, sig.name, timeout)
        kill_tree(proc.pid)
        proc.wait()


def read_int(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0]
        return int(first.strip())
    except (OSError, ValueError):
        return None


def log_since(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").rstrip()
