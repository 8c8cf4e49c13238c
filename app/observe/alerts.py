"""Alerts: a queue's DLQ depth reaching ``CONVEYOR_DLQ_ALERT_THRESHOLD``, or its oldest queued
job older than ``CONVEYOR_QUEUE_AGE_ALERT_SECONDS``.

Every API process checks every ``CONVEYOR_ALERT_INTERVAL_SECONDS``, but only one at a time
(a transaction-level advisory lock; the others skip that round). A crossing turns the alert's
``alert_states`` row on in a guarded upsert; only the process whose statement turned it on logs
the alert and POSTs it to ``CONVEYOR_ALERT_WEBHOOK``, so each crossing is sent once. It can
fire again only after the value fell back (the row turned off). The POST is signed like an
``http.request`` call: ``Conveyor-Signature: sha256=HMAC(CONVEYOR_HTTP_SIGNING_SECRET,
"<Conveyor-Timestamp>.<Conveyor-Alert-Id>.<Conveyor-Attempt>." + body)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.types import Float, Text

from app.jobs import queries
from app.outbound import signing
from app.settings import Settings

log = logging.getLogger(__name__)

LOCK_KEY = 0x636F6E76_616C7274 & 0x7FFFFFFFFFFFFFFF  # pg_try_advisory_xact_lock key
DLQ_DEPTH, QUEUE_AGE = "dlq_depth", "queue_age"
POST_ATTEMPTS = 3
POST_TIMEOUT = 10.0

OLDEST_QUEUED = text(
    "SELECT queue,"
    " extract(epoch FROM now() - coalesce(min(enqueued_at), min(created_at)))::float8 AS age"
    " FROM jobs WHERE status = 'queued' GROUP BY queue"
)
FIRE = text(
    "INSERT INTO alert_states (kind, queue, firing, value, changed_at)"
    " SELECT :kind, q, true, v, now() FROM unnest(:queues, :values) AS t(q, v)"
    " ON CONFLICT (kind, queue) DO UPDATE SET firing = true, value = excluded.value,"
    " changed_at = now() WHERE alert_states.firing = false"
    " RETURNING queue, value"
).bindparams(bindparam("queues", type_=ARRAY(Text)), bindparam("values", type_=ARRAY(Float)))
RESOLVE = text(
    "UPDATE alert_states SET firing = false, changed_at = now()"
    " WHERE kind = :kind AND firing AND NOT (queue = ANY(:queues)) RETURNING queue"
).bindparams(bindparam("queues", type_=ARRAY(Text)))


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str
    queue: str
    value: float
    threshold: float

    def message(self) -> str:
        if self.kind == DLQ_DEPTH:
            return (
                f"queue {self.queue!r}: {self.value:.0f} dead jobs (threshold {self.threshold:g})"
            )
        return (
            f"queue {self.queue!r}: oldest queued job waited {self.value:.0f}s"
            f" (threshold {self.threshold:g}s)"
        )


class Alerts:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self._posts: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        s = self.settings
        return s.dlq_alert_threshold is not None or s.queue_age_alert_seconds is not None

    def start(self) -> asyncio.Task[None] | None:
        if not self.enabled:
            return None
        return asyncio.create_task(self._loop(), name="alerts")

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alert check failed: %s", type(exc).__name__)
            await asyncio.sleep(self.settings.alert_interval_seconds)

    async def check(self) -> list[Alert]:
        """One round: returns the alerts this process fired (and is sending)."""
        s = self.settings
        fired: list[Alert] = []
        async with self.sessions.begin() as session:
            if not await session.scalar(text(f"SELECT pg_try_advisory_xact_lock({LOCK_KEY})")):
                return []  # another process is checking now
            if s.dlq_alert_threshold is not None:
                counts = await queries.queue_counts(session)
                dead = {q: float(c.get("dead", 0)) for q, c in counts.items()}
                fired += await _turn(
                    session, DLQ_DEPTH, dead, s.dlq_alert_threshold, inclusive=True
                )
            if s.queue_age_alert_seconds is not None:
                ages = {r.queue: float(r.age) for r in await session.execute(OLDEST_QUEUED)}
                fired += await _turn(session, QUEUE_AGE, ages, s.queue_age_alert_seconds)
        for alert in fired:  # committed: ours to send
            log.warning(
                "alert: %s",
                alert.message(),
                extra={
                    "alert": alert.kind,
                    "queue": alert.queue,
                    "value": alert.value,
                    "threshold": alert.threshold,
                },
            )
            if s.alert_webhook:
                task = asyncio.create_task(self._post(alert, s.alert_webhook))
                self._posts.add(task)
                task.add_done_callback(self._posts.discard)
        return fired

    async def stop(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._posts:
            await asyncio.wait(list(self._posts), timeout=POST_TIMEOUT)

    async def _post(self, alert: Alert, url: str) -> None:
        alert_id = str(uuid.uuid4())
        body = json.dumps(
            {
                "type": "alert.firing",
                "id": alert_id,
                "alert": alert.kind,
                "queue": alert.queue,
                "value": alert.value,
                "threshold": alert.threshold,
                "message": alert.message(),
                "at": datetime.now(UTC).isoformat(),
            },
            separators=(",", ":"),
        ).encode()
        async with httpx.AsyncClient(timeout=POST_TIMEOUT, trust_env=False) as client:
            for attempt in range(1, POST_ATTEMPTS + 1):
                headers = self._headers(alert_id, attempt, body)
                try:
                    response = await client.post(url, content=body, headers=headers)
                    if response.status_code < 500:
                        if response.status_code >= 400:
                            log.warning("alert webhook answered %d", response.status_code)
                        return
                except httpx.HTTPError as exc:
                    log.warning("alert webhook failed: %s", type(exc).__name__)
                await asyncio.sleep(attempt)
        log.warning("alert webhook gave up after %d attempts", POST_ATTEMPTS)

    def _headers(self, alert_id: str, attempt: int, body: bytes) -> dict[str, str]:
        """Signed like ``http.request`` calls and completion callbacks (Standard Webhooks,
        ``webhook-id`` = the alert id: retries of one alert carry the same id)."""
        return {
            "Content-Type": "application/json",
            "User-Agent": "conveyor-alerts",
            "Conveyor-Alert-Id": alert_id,
            "Conveyor-Attempt": str(attempt),
            **signing.headers(alert_id, body, self.settings.http_signing_secret),
        }


async def _turn(
    session: AsyncSession,
    kind: str,
    values: dict[str, float],
    threshold: float,
    *,
    inclusive: bool = False,
) -> list[Alert]:
    """Turn on the alerts over the threshold (returning those this statement turned on) and
    turn off the others."""
    over = {q: v for q, v in values.items() if (v >= threshold if inclusive else v > threshold)}
    queues = sorted(over)
    rows = await session.execute(
        FIRE, {"kind": kind, "queues": queues, "values": [over[q] for q in queues]}
    )
    fired = [Alert(kind, r.queue, float(r.value), threshold) for r in rows]
    for row in await session.execute(RESOLVE, {"kind": kind, "queues": queues}):
        log.info("alert resolved: %s for queue %r", kind, row.queue, extra={"alert": kind})
    return fired
