"""Stopping a running job on request: the heartbeat tells, this module stops the handler.

``POST /v1/jobs/{id}/cancel`` on a running job sets ``cancel_requested_at`` (Postgres is the
truth). Each heartbeat's lease extension returns which of this worker's attempts carry it;
for each, :func:`stop` sets the handler's ``ctx.cancelled``, cancels its task, and waits up to
``CONVEYOR_CANCEL_GRACE_SECONDS`` for it to end (a handler may catch ``CancelledError`` to clean
up). The attempt's outcome is then ``cancelled`` (fenced by its claim token like any other),
unless it had finished before the cancellation reached it: that outcome stands. A handler that
ignores the cancellation past the grace is abandoned: the outcome ``cancelled`` is reported
without it (its late return is dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from app.jobs.attempts import Completion
from workers.context import Attempt, Running, RunningSet
from workers.execution import cancelled
from workers.reporter import Reporter

log = logging.getLogger(__name__)


class Canceller:
    def __init__(self, running: RunningSet, reporter: Reporter, grace_seconds: float) -> None:
        self.running = running
        self.reporter = reporter
        self.grace_seconds = grace_seconds
        self._stopping: dict[Attempt, asyncio.Task[None]] = {}

    def requested(self, attempts: Iterable[Attempt]) -> None:
        """Stop each of these attempts (once each) that this worker still runs."""
        for attempt in attempts:
            entry = self.running.get(attempt[0])
            if entry is None or entry.attempt != attempt or entry.cancel.is_set():
                continue
            task = asyncio.create_task(self.stop(entry))
            self._stopping[attempt] = task
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for attempt, t in list(self._stopping.items()):
            if t is task:
                del self._stopping[attempt]

    async def stop(self, entry: Running) -> None:
        entry.cancel.set()  # ctx.cancelled, before the task hears of it
        task = entry.task
        if task is None or task.done():
            return  # finished first: its own outcome is reported
        log.info("cancelling running job on request", extra={"job_id": str(entry.job.id)})
        task.cancel("cancel requested")
        done, _ = await asyncio.wait([task], timeout=self.grace_seconds)
        if not done and not entry.reported:
            log.warning(
                "job ignored its cancellation for %.0fs; reported cancelled without it",
                self.grace_seconds,
                extra={"job_id": str(entry.job.id)},
            )
            report(self.reporter, entry, cancelled(entry.job))

    async def close(self) -> None:
        tasks = list(self._stopping.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def report(reporter: Reporter, entry: Running, completion: Completion) -> None:
    """Hand an attempt's outcome to the reporter, once."""
    if not entry.reported:
        entry.reported = True
        reporter.put(completion, entry)
