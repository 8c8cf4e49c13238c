"""``python -m workers``: run one worker process until SIGTERM/SIGINT, then exit 0."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from app.jobs.layout import LayoutMismatch
from app.logs import configure
from app.settings import get_settings
from workers.runner import Worker, WorkerConfig, default_name


async def _main(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def run_worker(queues: list[str], concurrency: int, name: str | None) -> int:
    settings = get_settings()
    configure(settings.log_level)
    if concurrency < 1:
        print("--concurrency must be at least 1", file=sys.stderr)
        return 2
    worker = Worker(
        settings, WorkerConfig(queues or ["default"], concurrency, name or default_name())
    )
    try:
        asyncio.run(_main(worker))
    except LayoutMismatch as exc:
        print(f"conveyor worker: {exc}", file=sys.stderr)
        return 2
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("--queues", default="default")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    return run_worker(queues, args.concurrency, args.name)


if __name__ == "__main__":
    sys.exit(main())
