"""Running one of the repository's scripts (``scripts/…``) as a test: a child process with
this Python, none of our own ``CONVEYOR_*`` settings (only those the test gives), and its
output in the failure when it exits with an error."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(
    script: str, *args: str, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``scripts/<script> args…`` from the repository's root; asserts that it succeeded."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    child.update(env or {})
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        env=child,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc
