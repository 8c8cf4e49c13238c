"""How a worker process ends: its exit codes, and the bounds that make every stop end it.

A stop signal makes the worker stop reading, let its jobs finish for the grace period (a second
signal ends the grace period at once), cancel what still runs, hand back what did not finish,
and exit. Two things could still hold the process: a handler that swallows ``CancelledError``
(asyncio cannot stop it), and a store that hangs during the hand-back. So:

- cancelled handlers get :data:`CANCEL_WAIT_SECONDS` to unwind; one that is still running then
  is abandoned: its job is handed back with the others, and the process exits with
  :data:`EXIT_ABANDONED` without waiting for it (:func:`abandon_leftovers`);
- a :class:`Watchdog` thread, armed by each stop signal, ends the process with
  :data:`EXIT_FORCED` if it is still alive :data:`FORCED_EXIT_SECONDS` after the grace period
  (after a second signal: after that signal), even if a handler blocks the event loop.
  Whatever was not handed back by then is recovered as after a crash (the leases lapse; those
  attempts count as ``worker lost``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Collection
from types import FrameType
from typing import Any, NoReturn

log = logging.getLogger(__name__)

EXIT_OK = 0  # stopped: every job finished or was handed back
EXIT_USAGE = 2  # bad command-line arguments
EXIT_NAME_IN_USE = 3  # refused at start: a live worker holds the same --name
EXIT_ABANDONED = 4  # stopped, but a handler ignored cancellation (its job was handed back)
EXIT_FORCED = 5  # the shutdown overran its bound: ended without finishing the hand-back
EXIT_DISPLACED = 6  # another process took over this worker's name while it was not heartbeating

CANCEL_WAIT_SECONDS = 3.0
FORCED_EXIT_SECONDS = 15.0
_SETTLE_SECONDS = 1.0


def hard_exit(code: int, message: str, *args: object) -> NoReturn:
    """Log, flush the log handlers, and end the process now (no cleanup, no waiting)."""
    log.error(message, *args)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


def displaced(name: str) -> NoReturn:
    """Our heartbeat found our name held by another process: it took the name over while we
    were frozen or cut off for longer than our lease. Our leases have lapsed and our attempts
    are another worker's to reclaim; going on (or handing back, which would release that
    process's jobs under the shared name) can only do harm: exit at once."""
    hard_exit(
        EXIT_DISPLACED,
        "worker name %r was taken over by another process while this one was not"
        " heartbeating; exiting at once",
        name,
    )


async def cancel_and_wait(
    tasks: Collection[asyncio.Task[Any]], within: float = CANCEL_WAIT_SECONDS
) -> set[asyncio.Task[Any]]:
    """Cancel the tasks and wait for them at most ``within`` seconds; return those still running
    (they ignored the cancellation)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=within)
    return pending


async def abandon_leftovers() -> int:
    """After the worker has stopped: cancel any task still alive (``asyncio.run`` would wait
    for them forever); if some ignore it, exit at once with :data:`EXIT_ABANDONED`."""
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    stuck = await cancel_and_wait(left, _SETTLE_SECONDS)
    if stuck:
        hard_exit(
            EXIT_ABANDONED,
            "exiting without %d task(s) that ignored cancellation: %s",
            len(stuck),
            ", ".join(sorted(t.get_name() for t in stuck)),
        )
    return EXIT_OK


def install_stop_signals(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], grace_seconds: float
) -> Watchdog:
    """SIGTERM and SIGINT call ``stop`` on the loop and arm the watchdog: the first for the
    grace period plus :data:`FORCED_EXIT_SECONDS`, each later one for
    :data:`FORCED_EXIT_SECONDS` alone. Plain signal handlers (not the loop's), so that a signal
    arms the watchdog even while a handler blocks the event loop."""
    watchdog = Watchdog()
    received = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        watchdog.arm(FORCED_EXIT_SECONDS + (grace_seconds if received == 1 else 0.0))
        loop.call_soon_threadsafe(stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return watchdog


class Watchdog:
    """Ends the process if it is still alive a while after a stop signal. A thread, so that it
    fires even while the event loop is busy."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float) -> None:
        """(Re)start the countdown: the process ends ``seconds`` from now unless it exits."""
        self.disarm()
        timer = threading.Timer(seconds, self._fire, args=(seconds,))
        timer.daemon = True
        timer.start()
        self._timer = timer

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @staticmethod
    def _fire(seconds: float) -> None:
        hard_exit(
            EXIT_FORCED, "shutdown did not finish %.0fs after the stop signal; exiting", seconds
        )
