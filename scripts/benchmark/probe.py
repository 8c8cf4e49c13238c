"""Counts and timestamps recorded inside a peer's worker process, read by the harness.

A handler calls ``hit(enqueued_at)``; a daemon thread writes ``<dir>/<pid>-<id>.json`` (count,
first and last start) and appends the new enqueue→start latencies to ``<dir>/<pid>-<id>.lat``
every 0.2 s, so the harness can follow a drain without a round trip per job.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class Probe:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._written = 0
        threading.Thread(target=self._flush_forever, daemon=True).start()

    def hit(self, enqueued_at: float | None) -> None:
        now = time.time()
        with self._lock:
            if not self.count:
                self.first = now
            self.last = now
            self.count += 1
            if enqueued_at:
                self.latencies.append(now - enqueued_at)

    def _flush_forever(self) -> None:
        name = f"{os.getpid()}-{id(self)}"
        counts, lat = self.directory / f"{name}.json", self.directory / f"{name}.lat"
        while True:
            time.sleep(0.2)
            with self._lock:
                state = {"count": self.count, "first": self.first, "last": self.last}
                new = self.latencies[self._written :]
                self._written = len(self.latencies)
            try:
                if new:
                    with lat.open("a") as f:
                        f.write("".join(f"{x:.6f}\n" for x in new))
                tmp = counts.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(counts)
            except OSError:  # the harness removed the directory: the run is over
                return


_probe: Probe | None = None
_creating = threading.Lock()


def probe() -> Probe:
    """The process's probe, writing to ``$BENCH_PROBE_DIR``."""
    global _probe
    if _probe is None:
        with _creating:  # handlers may run in several threads (dramatiq)
            if _probe is None:
                _probe = Probe(Path(os.environ["BENCH_PROBE_DIR"]))
    return _probe


def read(directory: Path) -> tuple[int, float, float, list[float]]:
    """Total count, earliest first start, latest last start, all latencies so far."""
    count, first, last = 0, float("inf"), 0.0
    latencies: list[float] = []
    for f in directory.glob("*.json"):
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if state["count"]:
            count += state["count"]
            first, last = min(first, state["first"]), max(last, state["last"])
    for f in directory.glob("*.lat"):
        latencies.extend(float(x) for x in f.read_text().split())
    return count, first, last, latencies
