"""Job-change notifications over Redis pub/sub, on the channel ``P:jobs-changed``.

A message is a wake-up, never a record: ``{"t": [ids], "c": [ids]}``, the jobs that reached a
terminal status (``t``) and those that changed otherwise (``c``: claimed, failed and
retrying, promoted, progress). The workers publish one message per batch they write
(claims, completions, reclaims, promotions, progress); the API publishes its own terminal
transitions (cancel). Every API process subscribes once (:class:`Subscriber`) and wakes its
in-process waiters (:mod:`app.jobs.watch`). A lost message (Redis down, a subscriber
reconnecting) only delays those waiters until their slow re-check reads Postgres;
publishing never fails a caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from uuid import UUID

from redis.asyncio import Redis

from app.streams.connection import RedisClient

log = logging.getLogger(__name__)

RECONNECT_PAUSE_SECONDS = 1.0
READ_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class Change:
    """What one message says: these jobs are terminal now, those changed otherwise."""

    terminal: frozenset[UUID] = field(default_factory=frozenset)
    changed: frozenset[UUID] = field(default_factory=frozenset)


def encode(terminal: Iterable[UUID], changed: Iterable[UUID] = ()) -> str:
    return json.dumps({"t": [str(i) for i in terminal], "c": [str(i) for i in changed]})


def decode(data: str | bytes) -> Change | None:
    """The message's ids, or None for a message that is not one of ours."""
    try:
        body = json.loads(data)
        return Change(
            frozenset(UUID(i) for i in body.get("t", [])),
            frozenset(UUID(i) for i in body.get("c", [])),
        )
    except (ValueError, TypeError, AttributeError):
        return None


class Publisher:
    """PUBLISH of job changes; never raises (a lost message costs a waiter a re-check)."""

    def __init__(self, redis: RedisClient, channel: str) -> None:
        self.redis = redis
        self.channel = channel

    def announcement(
        self, terminal: Iterable[UUID], changed: Iterable[UUID] = ()
    ) -> Announcement | None:
        """The message for these jobs, to send with other commands (see
        :meth:`app.streams.client.StreamClient.ack`); None when there is nothing to say."""
        terminal, changed = list(terminal), list(changed)
        if not terminal and not changed:
            return None
        return Announcement(self.channel, encode(terminal, changed))

    async def publish(self, terminal: Iterable[UUID], changed: Iterable[UUID] = ()) -> None:
        message = self.announcement(terminal, changed)
        if message is not None:
            await send(self.redis, message)


@dataclass(frozen=True)
class Announcement:
    """One job-change message, ready to PUBLISH."""

    channel: str
    message: str


async def send(redis: RedisClient, announcement: Announcement) -> None:
    """PUBLISH one message; never raises (a lost message costs a waiter a re-check)."""
    try:
        await redis.publish(announcement.channel, announcement.message)
    except Exception as exc:
        log.debug("job-change notification not published: %s", exc)


class Subscriber:
    """One subscription per process: calls ``deliver`` with each message, reconnecting (with
    a pause) whenever Redis goes away, for as long as :meth:`run` runs.

    A plain connection to ``url`` even with Redis Cluster: PUBLISH reaches every node.
    """

    def __init__(
        self, url: str, channel: str, deliver: Callable[[Change], None], timeout: float
    ) -> None:
        self.url = url
        self.channel = channel
        self.deliver = deliver
        self.timeout = timeout
        self.connected = asyncio.Event()  # set while subscribed (tests wait for it)

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("job-change subscription lost (%s); waiters re-check", exc)
                failing = True
            self.connected.clear()
            await asyncio.sleep(RECONNECT_PAUSE_SECONDS)

    async def _listen(self) -> None:
        redis = Redis.from_url(
            self.url,
            decode_responses=True,
            socket_connect_timeout=self.timeout,
            socket_timeout=self.timeout + READ_TIMEOUT_SECONDS,
            health_check_interval=10,
        )
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self.connected.set()
            log.debug("subscribed to %s", self.channel)
            while True:
                message = await pubsub.get_message(timeout=READ_TIMEOUT_SECONDS)
                if message is None or message.get("type") != "message":
                    continue
                change = decode(message["data"])
                if change is not None:
                    self.deliver(change)
        finally:
            self.connected.clear()
            with suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await redis.aclose()
