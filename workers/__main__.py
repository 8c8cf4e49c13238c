"""``python -m workers``: run one worker process until SIGTERM/SIGINT (exit codes: see
:mod:`workers.shutdown`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from app.jobs.workers_table import NameInUse
from app.logs import configure
from app.settings import get_settings
from workers import shutdown
from workers.runner import Worker, WorkerConfig, default_name

MAX_NAME_CHARS = 200


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a worker name (a Redis consumer and a column value), if it can't."""
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters"
    if not name.isprintable():  # control characters, and undecodable bytes (lone surrogates)
        return "must be printable UTF-8 text"
    return None


async def _main(worker: Worker) -> int:
    loop = asyncio.get_running_loop()
    shutdown.install_stop_signals(loop, worker.stop, worker.settings.shutdown_grace_seconds)
    await worker.run()
    return await shutdown.abandon_leftovers()


def run_worker(queues: list[str], concurrency: int, name: str | None) -> int:
    settings = get_settings()
    configure(settings.log_level)
    if concurrency < 1:
        print("--concurrency must be at least 1", file=sys.stderr)
        return shutdown.EXIT_USAGE
    if name is not None and (problem := name_problem(name)):
        print(f"--name {problem}", file=sys.stderr)
        return shutdown.EXIT_USAGE
    worker = Worker(
        settings, WorkerConfig(queues or ["default"], concurrency, name or default_name())
    )
    try:
        return asyncio.run(_main(worker))
    except NameInUse as exc:
        print(f"conveyor worker: {exc}", file=sys.stderr)
        return shutdown.EXIT_NAME_IN_USE


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
