"""``python -m workers``: run a worker until SIGTERM/SIGINT, then exit 0.

With ``--processes N`` (N > 1), a parent starts N worker processes and forwards the signals.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from app.logs import configure
from app.settings import get_settings
from workers.context import WorkerConfig, default_name
from workers.processes import Processes, child_names
from workers.runner import Worker


async def _main(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it is with the default dependencies on Linux)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_worker(queues: list[str], concurrency: int, name: str | None, processes: int = 1) -> int:
    settings = get_settings()
    configure(settings.log_level)
    if concurrency < 1:
        print("--concurrency must be at least 1", file=sys.stderr)
        return 2
    if processes < 1:
        print("--processes must be at least 1", file=sys.stderr)
        return 2
    queues = queues or ["default"]
    if processes > 1:
        return Processes(queues, concurrency, child_names(name, processes)).run()
    worker = Worker(settings, WorkerConfig(queues, concurrency, name or default_name()))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_main(worker))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("--queues", default="default")
    parser.add_argument("--concurrency", type=int, default=16, help="per process")
    parser.add_argument("--name", default=None)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    return run_worker(queues, args.concurrency, args.name, args.processes)


if __name__ == "__main__":
    sys.exit(main())
