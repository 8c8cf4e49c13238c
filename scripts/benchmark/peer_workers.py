"""The peers' worker side: one no-op handler each, recording its start in the probe.

- PgQueuer: ``python -m benchmark.peer_workers pgqueuer PROCESSES BATCH`` (one PgQueuer per
  process on its own asyncpg connection, ``run(batch_size=BATCH)``);
- taskiq: ``taskiq worker benchmark.peer_workers:taskiq_worker_broker --workers N``;
- dramatiq: ``dramatiq benchmark.peer_workers:dramatiq_worker_broker --processes N``.

Settings come from ``BENCH_*`` variables set by :mod:`benchmark.peers`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
from typing import Any

from benchmark.probe import probe


def taskiq_broker(redis_url: str, tag: str) -> tuple[Any, Any]:
    """A Redis Streams broker on the stream ``tag`` and its ``noop`` task."""
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(redis_url, queue_name=tag, consumer_group_name=tag)

    async def noop(t: float | None = None) -> None:
        probe().hit(t)

    return broker, broker.register_task(noop, task_name="noop")


def taskiq_worker_broker() -> Any:
    return taskiq_broker(os.environ["BENCH_REDIS_URL"], os.environ["BENCH_TAG"])[0]


def dramatiq_broker(redis_url: str, tag: str) -> Any:
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=redis_url, namespace=tag)  # type: ignore[no-untyped-call]


def dramatiq_worker_broker() -> None:
    import dramatiq

    broker = dramatiq_broker(os.environ["BENCH_REDIS_URL"], os.environ["BENCH_TAG"])
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name="noop", queue_name="default", max_retries=0)
    def noop(t: float | None = None) -> None:
        probe().hit(t)


async def _pgqueuer(batch: int) -> None:
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    conn = await asyncpg.connect(os.environ["BENCH_DATABASE_DSN"])
    pgq = PgQueuer.from_asyncpg_connection(conn)

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        probe().hit(float(job.payload) if job.payload else None)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pgq.shutdown.set)
    await pgq.run(batch_size=batch)


def _pgqueuer_process(batch: int) -> None:
    asyncio.run(_pgqueuer(batch))


def main(argv: list[str]) -> int:
    system, processes, batch = argv[0], int(argv[1]), int(argv[2])
    if system != "pgqueuer":
        print(f"unknown system {system}", file=sys.stderr)
        return 2
    if processes == 1:
        _pgqueuer_process(batch)
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the children get it from the group
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_pgqueuer_process, args=(batch,)) for _ in range(processes)]
    for c in children:
        c.start()
    for c in children:
        c.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
