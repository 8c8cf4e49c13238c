"""The ``conveyor`` command: the server commands here, the operator commands in
:mod:`app.cli.operator_commands`."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.settings import get_settings

DESCRIPTION = "Conveyor, an HTTP job queue: run its servers, or operate it over its HTTP API."


def _migrate(args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade

    upgrade(get_settings().database_url)
    print("migrations applied")
    if args.repartition:
        import asyncio

        from app.jobs.layout import repartition_database

        return asyncio.run(repartition_database(get_settings()))
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    settings = get_settings()
    json_logs = (settings.log_format or "json") == "json"
    if json_logs and args.workers > 1:  # the supervising parent's own lines (children: create_app)
        from app.logs import configure

        configure(settings.log_level, "json")
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop=_available("uvloop", "auto"),
        http=_available("httptools", "auto"),
        timeout_keep_alive=args.keep_alive or settings.keepalive_seconds,
        timeout_graceful_shutdown=10,
        log_level=settings.log_level.lower(),
        # JSON logs: uvicorn's own loggers go through the root handler that create_app sets up
        log_config=None if json_logs else LOGGING_CONFIG,
        access_log=args.access_log,  # off: one INFO line per submission is the service's own
        server_header=False,
    )
    return 0


def _available(module: str, fallback: str) -> str:
    """uvloop and httptools (installed with uvicorn[standard]) when importable."""
    import importlib.util

    return module if importlib.util.find_spec(module) is not None else fallback


def _worker(args: argparse.Namespace) -> int:
    from workers.__main__ import run_worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    return run_worker(queues, args.concurrency, args.name, args.processes, args.metrics_port)


def _dev(args: argparse.Namespace) -> int:
    from app.devserver.supervisor import run_dev

    return run_dev(args.host, args.port, args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    """The ``conveyor`` command line (deployment files are checked against it)."""
    parser = argparse.ArgumentParser(prog="conveyor", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="run everything locally with embedded Redis and Postgres")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=_dev)

    p = sub.add_parser("migrate", help="apply database migrations (idempotent)")
    p.add_argument(
        "--repartition",
        action="store_true",
        help="record this environment's CONVEYOR_PARTITIONS and CONVEYOR_REDIS_PREFIX as the"
        " stream layout and re-send every queued job (stop every API and worker first)",
    )
    p.set_defaults(func=_migrate)

    p = sub.add_parser("api", help="run the HTTP gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--keep-alive",
        type=int,
        default=None,
        help="seconds an idle keep-alive connection stays open (CONVEYOR_KEEPALIVE_SECONDS, 75)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (off: faster)")
    p.set_defaults(func=_api)

    p = sub.add_parser("worker", help="run worker processes")
    p.add_argument("--queues", default="default")
    p.add_argument("--concurrency", type=int, default=16, help="jobs at once, per process")
    p.add_argument("--name", default=None)
    p.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve each worker process's own metrics on this port (process i: port + i)",
    )
    p.set_defaults(func=_worker)

    from app.cli.operator_commands import add_operator_commands

    add_operator_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
