"""``python -m workers``: run a worker until SIGTERM/SIGINT (exit codes: see
:mod:`workers.shutdown`).

With ``--processes N`` (N > 1), a parent starts N worker processes and forwards the signals.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from app.gcpolicy import settle_gc
from app.jobs.layout import LayoutMismatch
from app.jobs.workers_table import NameInUse
from app.logs import configure
from app.observe import tracing
from app.settings import get_settings
from workers import shutdown
from workers.context import WorkerConfig, default_name
from workers.processes import Processes, child_names
from workers.runner import Worker


async def _main(worker: Worker) -> int:
    loop = asyncio.get_running_loop()
    shutdown.install_stop_signals(loop, worker.stop, worker.ctx.settings.shutdown_grace_seconds)
    await worker.run()
    return await shutdown.abandon_leftovers()


MAX_NAME_CHARS = 200
METRICS_PORT_HELP = (
    "serve this process's own metrics (Prometheus) on this port; with --processes N,"
    " process i uses port + i"
)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a worker name (a Redis consumer and a column value), if it can't."""
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters"
    if not name.isprintable():  # control characters, and undecodable bytes (lone surrogates)
        return "must be printable UTF-8 text"
    return None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it is with the default dependencies on Linux)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_worker(
    queues: list[str],
    concurrency: int,
    name: str | None,
    processes: int = 1,
    metrics_port: int | None = None,
) -> int:
    settings = get_settings()
    configure(settings.log_level, settings.log_format or "json")
    if concurrency < 1:
        print("--concurrency must be at least 1", file=sys.stderr)
        return shutdown.EXIT_USAGE
    if processes < 1:
        print("--processes must be at least 1", file=sys.stderr)
        return shutdown.EXIT_USAGE
    queues = queues or ["default"]
    if processes > 1:
        names = child_names(name, processes)
        for child in names:  # the children's names are derived from --name: check them here
            if child is not None and (problem := name_problem(child)):
                print(f"--name {problem} (with -{processes} appended)", file=sys.stderr)
                return shutdown.EXIT_USAGE
        return Processes(queues, concurrency, names, metrics_port).run()
    if name is not None and (problem := name_problem(name)):
        print(f"--name {problem}", file=sys.stderr)
        return shutdown.EXIT_USAGE
    config = WorkerConfig(queues, concurrency, name or default_name(), metrics_port)
    if tracing.setup("conveyor-worker"):  # off unless the OTEL_* variables ask for it
        tracing.instrument_libraries("httpx")  # handlers' calls; the worker's own SQL is not
    worker = Worker(settings, config)
    settle_gc()  # the handlers are imported: what exists now lives as long as the process
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_main(worker))
    except NameInUse as exc:
        print(f"conveyor worker: {exc}", file=sys.stderr)
        return shutdown.EXIT_NAME_IN_USE
    except LayoutMismatch as exc:
        print(f"conveyor worker: {exc}", file=sys.stderr)
        return shutdown.EXIT_USAGE
    finally:
        tracing.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("--queues", default="default")
    parser.add_argument("--concurrency", type=int, default=16, help="per process")
    parser.add_argument("--name", default=None)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--metrics-port", type=int, default=None, help=METRICS_PORT_HELP)
    args = parser.parse_args()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    return run_worker(queues, args.concurrency, args.name, args.processes, args.metrics_port)


if __name__ == "__main__":
    sys.exit(main())
