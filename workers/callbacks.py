"""The completion-callback duty of every worker: deliver the due callbacks of the jobs of its
queues, and record the outcome.

Deliveries live in Postgres (app.jobs.callbacks), so they survive a worker crash: a delivery
in flight on a dead worker is due again once its lease runs out. Each POST goes to an address
checked by the same policy as ``http.request`` (app.outbound.destinations: the allow-list, then
every resolved address), is signed with the Standard Webhooks scheme (app.outbound.signing),
follows no redirect, and counts as delivered on a 2xx only. A refused destination fails the
callback for good; anything else is retried with backoff until the retry window
(CONVEYOR_CALLBACK_RETRY_SECONDS after the job finished) is over. The job's own status is
never touched.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from app.jobs import callbacks
from app.jobs.callbacks import Due
from app.outbound import signing
from app.outbound.destinations import (
    BlockedDestination,
    HttpRequestFailed,
    allowed_hosts,
    destination,
)
from workers.context import WorkerContext
from workers.handlers.http import Request, exchange

log = logging.getLogger(__name__)

BATCH = 20  # deliveries taken (and sent concurrently) per pass
USER_AGENT = "Conveyor (callback)"


async def post(client: httpx.AsyncClient, due: Due, secret: str | None, hosts: str) -> str | None:
    """POST the job to its callback URL; None when delivered, else the error. Raises
    :class:`BlockedDestination` when the URL may not be called."""
    url = httpx.URL(due.url)
    ip = await destination(url, allowed_hosts(hosts))
    body = due.body()
    headers = {
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        **signing.headers(due.message_id, body, secret),
    }
    reply = await exchange(client, Request("POST", url, headers, body), ip, headers)
    if 200 <= reply.status < 300:
        return None
    return f"HTTP {reply.status}"


class CallbackDuty:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    @property
    def lease_seconds(self) -> float:
        """Longer than one delivery can take: no other worker takes it meanwhile."""
        return self.ctx.settings.callback_timeout_seconds * 2 + 5

    async def deliver_callbacks(self) -> None:
        """Deliver due callbacks until none is left (at most a few batches per call)."""
        for _ in range(5):
            async with self.ctx.db.acquire() as conn:
                due = await callbacks.take_due(
                    conn, self.ctx.config.queues, BATCH, self.lease_seconds
                )
            if not due:
                return
            timeout = self.ctx.settings.callback_timeout_seconds
            async with httpx.AsyncClient(
                timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False
            ) as client:
                await asyncio.gather(*(self._one(client, d) for d in due))
            if len(due) < BATCH:
                return

    async def _one(self, client: httpx.AsyncClient, due: Due) -> None:
        s = self.ctx.settings
        permanent = False
        try:
            async with asyncio.timeout(s.callback_timeout_seconds):
                error = await post(client, due, s.http_signing_secret, s.http_allowed_hosts)
        except BlockedDestination as exc:
            error, permanent = str(exc), True
        except TimeoutError:
            error = f"no answer within {s.callback_timeout_seconds:g}s"
        except (HttpRequestFailed, httpx.HTTPError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # recorded like any failure: the retry window bounds it
            log.warning("callback delivery failed unexpectedly", exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
        async with self.ctx.db.acquire() as conn:
            status = await callbacks.record(
                conn,
                due,
                error,
                permanent=permanent,
                backoff=self.ctx.backoff,
                retry_seconds=s.callback_retry_seconds,
            )
        log.info(
            "callback %s",
            status or "superseded",
            extra={"job_id": str(due.id), "attempt": due.attempt, "error": error},
        )
