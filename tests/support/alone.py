"""Tests marked ``serial`` run alone while the suite runs in parallel (pytest-xdist).

``scripts/test`` runs the suite in several pytest processes. While a test runs (setup, call and
teardown) its process holds a shared lock on a file of the run; a test marked ``serial`` (one
that asserts a timing or measures a load) holds it exclusively instead, so that no other test
runs beside it. A waiting ``serial`` test first takes a turnstile lock that the others pass
through on their way to the shared lock, so a stream of short tests cannot starve it.

The locks are ``flock`` locks on files in the run's temporary directory: a process that dies
releases its lock with it. Without xdist nothing is locked.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

MARK = "serial"


def _lock(stack: ExitStack, path: Path, exclusive: bool) -> ExitStack:
    """Lock ``path`` (blocking) until ``stack`` closes; returns a stack that releases only it."""
    held = ExitStack()
    f = held.enter_context(path.open("a"))
    fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    held.callback(fcntl.flock, f.fileno(), fcntl.LOCK_UN)  # (runs before the close)
    stack.enter_context(held)
    return held


@contextmanager
def turn(directory: Path, alone: bool) -> Iterator[None]:
    """Hold the run's test lock: exclusively when ``alone``, else shared."""
    with ExitStack() as stack:
        gate = _lock(stack, directory / "serial-gate.lock", exclusive=True)
        _lock(stack, directory / "serial-tests.lock", exclusive=alone)
        if not alone:
            gate.close()  # let the next waiting test, serial or not, to the gate
        yield


def lock_directory(config: pytest.Config) -> Path | None:
    """The directory all xdist workers of this run share; None outside xdist."""
    if not hasattr(config, "workerinput"):
        return None
    # Each worker's base temp directory is <the controller's>/<worker id>.
    base: Path = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return base.parent
