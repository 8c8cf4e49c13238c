"""Every Redis command Conveyor sends goes through :class:`StreamClient`.

A stream entry only says "look at job X": ``{"job": "<uuid>"}``, with ``"tp": "<traceparent>"``
when the API sent it with tracing on (ADR 0022). Postgres decides whether the delivery starts
an attempt, so duplicate entries are harmless.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from app.streams import notify
from app.streams.connection import RedisClient
from app.streams.dead_letter import DLQ_MAXLEN, bounded_dead_letter
from app.streams.keys import GROUP, Keys

log = logging.getLogger(__name__)


def _script(name: str) -> str:
    return resources.files("app.streams").joinpath("lua", f"{name}.lua").read_text()


@dataclass(slots=True)  # not frozen: built once per stream entry read (see NewJob)
class Delivery:
    stream: str
    entry_id: str
    job_id: UUID | None  # None when the entry's body is unreadable
    traceparent: str | None = None  # the entry's ``tp`` field (tracing on at submission)


@dataclass(frozen=True)
class Reclaimed:
    deliveries: list[Delivery]
    deleted: list[str]  # pending ids whose entries no longer exist (Redis >= 7 XAUTOCLAIM)


def _group_gone(exc: ResponseError) -> bool:
    """``NOGROUP``: the stream or its group does not exist; ``UNBLOCKED``: the stream was
    deleted while a blocking read waited on it."""
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def _parse_job(fields: dict[str, str] | None) -> UUID | None:
    try:
        return UUID((fields or {})["job"])
    except (KeyError, ValueError):
        return None


def _delivery(stream: str, entry_id: str, fields: dict[str, str] | None) -> Delivery:
    return Delivery(stream, entry_id, _parse_job(fields), (fields or {}).get("tp"))


class StreamClient:
    def __init__(self, redis: RedisClient, keys: Keys, *, maxlen: int) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self._dispatch = redis.register_script(_script("dispatch"))
        self._ratelimit = redis.register_script(_script("ratelimit"))
        self._groups: set[str] = set()
        self.data_loss = asyncio.Event()  # set when a consumer group had vanished
        self.lost: set[str] = set()  # streams whose group was missing, not yet re-sent

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- groups -----------------------------------------------------------------------------

    async def ensure_groups(self, streams: Iterable[str], *, force: bool = False) -> list[str]:
        """Create the consumer group at id 0 (so nothing is skipped), with MKSTREAM.

        Returns the streams whose group had to be created. A group missing from a stream this
        client has served before means the stream was deleted, evicted or lost with Redis
        data: its entries may be gone. Every such stream is remembered in :attr:`lost` (and
        :attr:`data_loss` set) until the caller has re-sent its queue (:meth:`settle_lost`).
        """
        wanted = [s for s in dict.fromkeys(streams) if force or s not in self._groups]
        if not wanted:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in wanted:
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        created: list[str] = []
        for stream, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, Exception):
                if "BUSYGROUP" not in str(reply):
                    raise reply
            else:
                created.append(stream)
            self._groups.add(stream)
        if created:
            self.lost.update(created)
            self.data_loss.set()
        return created

    def settle_lost(self, streams: Iterable[str]) -> None:
        """The queues of these lost streams have been re-sent."""
        self.lost.difference_update(streams)

    def forget_groups(self) -> None:
        self._groups.clear()

    async def _group_missing(self, streams: Sequence[str]) -> None:
        """A read met ``NOGROUP`` (or was unblocked because its stream was deleted)."""
        log.warning("consumer group missing (stream deleted or Redis lost data); recreating it")
        self.data_loss.set()
        await self.ensure_groups(streams, force=True)

    # -- producing --------------------------------------------------------------------------

    async def dispatch(
        self,
        targets: Sequence[tuple[str, UUID]],
        traceparents: Mapping[UUID, str] | None = None,
    ) -> dict[UUID, str]:
        """Add ``(stream, job_id)`` entries; returns the stream entry id of each job added.
        A job in ``traceparents`` gets that value in its entry's ``tp`` field.

        Ids that do not fit under the stream bound are left out; the dispatcher sends them
        once the backlog shrinks.
        """
        by_stream: dict[str, list[UUID]] = defaultdict(list)
        for stream, job_id in targets:
            by_stream[stream].append(job_id)
        calls: list[tuple[str, list[Any]]] = [
            (stream, [self.maxlen, *_args(ids, traceparents)]) for stream, ids in by_stream.items()
        ]
        if isinstance(self.redis, RedisCluster):  # cluster pipelines refuse EVALSHA
            added = await asyncio.gather(*(self._dispatch(keys=[k], args=a) for k, a in calls))
        else:
            added = await self._dispatch_pipelined(calls)
        sent: dict[UUID, str] = {}
        for (_, ids), entries in zip(by_stream.items(), added, strict=True):
            sent.update(zip(ids, map(_text, entries or []), strict=False))
        return sent

    async def room(self, streams: Sequence[str]) -> dict[str, int]:
        """How many entries each stream can take before it reaches the bound."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        return {s: max(0, self.maxlen - int(n)) for s, n in zip(streams, lengths, strict=True)}

    async def entries_exist(self, entries: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each ``(stream, entry id)`` is still in its stream (XRANGE id id)."""
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, entry_id in entries:
                pipe.xrange(stream, entry_id, entry_id, count=1)
            replies = await pipe.execute()
        return [bool(r) for r in replies]

    async def _dispatch_pipelined(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """EVALSHA every call in one pipeline. The script is loaded once (when Redis first
        answers NOSCRIPT, e.g. after a restart), not checked with SCRIPT EXISTS per pipeline;
        the calls that met NOSCRIPT did nothing, so they are simply sent again."""
        sha = self._dispatch.sha
        replies = await self._evalsha_all(sha, calls)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.redis.script_load(self._dispatch.script)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            retried = await self._evalsha_all(sha, [calls[i] for i in again])
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _evalsha_all(self, sha: str, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, args in calls:
                pipe.evalsha(sha, 1, stream, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def add_dead_letter(self, fields: dict[str, str]) -> None:
        """Append a dead job's notification to ``P:dlq``, bounded in size and count.

        ``fields`` as from :func:`dead_letter_entry`; an ``errors`` field holding a job's whole
        history (a JSON list) is cut down the same way. The stream keeps the newest
        ``min(CONVEYOR_STREAM_MAXLEN, DLQ_MAXLEN)`` entries, trimmed exactly.
        """
        entry: dict[Any, Any] = bounded_dead_letter(fields)
        maxlen = min(self.maxlen, DLQ_MAXLEN)
        await self.redis.xadd(self.keys.dlq, entry, maxlen=maxlen, approximate=False)

    async def warn_unless_noeviction(self) -> None:
        """Log a warning when Redis may evict keys: a stream or consumer group evicted under
        memory pressure delays jobs until the next reconcile notices. ``CONFIG`` is often
        refused on managed Redis; then say so at debug level and go on."""
        try:
            if isinstance(self.redis, RedisCluster):
                reply: Any = await self.redis.config_get(
                    "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
                )
            else:
                reply = await self.redis.config_get("maxmemory-policy")
        except Exception as exc:
            log.debug("cannot read Redis maxmemory-policy (%s); not checked", exc)
            return
        replies = reply.values() if reply and "maxmemory-policy" not in reply else [reply]
        policies = {str(r.get("maxmemory-policy")) for r in replies if isinstance(r, dict)}
        if not policies:
            log.debug("Redis did not report its maxmemory-policy; not checked")
        for policy in sorted(policies - {"noeviction"}):
            log.warning(
                "Redis maxmemory-policy is %s: Conveyor needs noeviction (an evicted stream"
                " or consumer group delays its jobs until the next reconcile)",
                policy,
            )

    # -- consuming --------------------------------------------------------------------------

    async def read(
        self,
        streams: Sequence[str],
        consumer: str,
        count: int,
        block_ms: int | None,
        announce: notify.Announcement | None = None,
    ) -> list[Delivery]:
        """XREADGROUP new entries from ``streams`` (all in one cluster slot). ``announce``: a
        job-change message, PUBLISHed first in the same round trip (on its own with Redis
        Cluster; lost, like any message, if the read fails)."""
        try:
            if announce is not None and not isinstance(self.redis, RedisCluster):
                reply = await self._announce_and_read(streams, consumer, count, block_ms, announce)
            else:
                if announce is not None:
                    await notify.send(self.redis, announce)
                reply = await self.redis.xreadgroup(
                    GROUP, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
                )
        except ResponseError as exc:
            if not _group_gone(exc):
                raise
            await self._group_missing(streams)
            return []
        return [
            _delivery(stream, entry_id, fields)
            for stream, entries in _stream_items(reply)
            for entry_id, fields in entries
        ]

    async def _announce_and_read(
        self,
        streams: Sequence[str],
        consumer: str,
        count: int,
        block_ms: int | None,
        announce: notify.Announcement,
    ) -> Any:
        """PUBLISH then XREADGROUP in one pipeline; the read's reply (or its error)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(announce.channel, announce.message)
            pipe.xreadgroup(
                GROUP, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
            )
            published, reply = await pipe.execute(raise_on_error=False)
        if isinstance(published, Exception):
            log.debug("job-change notification not published: %s", published)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def read_own(self, streams: Sequence[str], consumer: str, count: int) -> list[Delivery]:
        """Entries delivered to ``consumer`` and not acked (XREADGROUP from id 0), e.g. those
        of a blocking read whose reply was lost when the read was cancelled."""
        reply = await self.redis.xreadgroup(
            GROUP, consumer, dict.fromkeys(streams, "0"), count=count
        )
        return [
            _delivery(stream, entry_id, fields)
            for stream, entries in _stream_items(reply)
            for entry_id, fields in entries
        ]

    async def ack(
        self, deliveries: Iterable[Delivery], announce: notify.Announcement | None = None
    ) -> None:
        """XACK and XDEL finished entries, so streams hold only live work. ``announce``: a
        job-change message, PUBLISHed first in the same round trip (on its own with Redis
        Cluster, whose pipelines go by key slot; and then, as alone, it never raises)."""
        by_stream = _entries_by_stream(deliveries)
        if announce is not None and (not by_stream or isinstance(self.redis, RedisCluster)):
            await notify.send(self.redis, announce)
            announce = None
        if not by_stream:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            if announce is not None:
                pipe.publish(announce.channel, announce.message)
            for stream, ids in by_stream.items():
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()

    async def refresh(self, consumer: str, deliveries: Iterable[Delivery]) -> None:
        """Reset the idle time of our own pending entries so nobody reclaims a live job."""
        by_stream = _entries_by_stream(deliveries)
        if not by_stream:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, GROUP, consumer, 0, ids, justid=True)
            await pipe.execute(raise_on_error=False)

    async def autoclaim(
        self, stream: str, consumer: str, min_idle_ms: int, count: int = 100
    ) -> Reclaimed:
        """XAUTOCLAIM up to ``count`` idle entries of dead consumers, following the cursor."""
        deliveries: list[Delivery] = []
        deleted: list[str] = []
        cursor = "0-0"
        for _ in range(100):
            try:
                reply = await self.redis.xautoclaim(
                    stream,
                    GROUP,
                    consumer,
                    min_idle_ms,
                    start_id=cursor,
                    count=count - len(deliveries),
                )
            except ResponseError as exc:
                if not _group_gone(exc):
                    raise
                await self._group_missing([stream])
                break
            cursor, entries = reply[0], reply[1]
            deleted.extend(reply[2] if len(reply) > 2 else [])
            deliveries.extend(_delivery(stream, e, f) for e, f in entries)
            if cursor == "0-0" or len(deliveries) >= count:
                break
        return Reclaimed(deliveries, deleted)

    async def consumers(self, stream: str) -> list[dict[str, Any]]:
        try:
            result: list[dict[str, Any]] = await self.redis.xinfo_consumers(stream, GROUP)
            return result
        except ResponseError:
            return []

    async def delete_consumer(self, stream: str, consumer: str) -> None:
        await self.redis.xgroup_delconsumer(stream, GROUP, consumer)

    async def pending_counts(self, streams: Sequence[str]) -> list[int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xpending(stream, GROUP)
            replies = await pipe.execute(raise_on_error=False)
        return [r["pending"] if isinstance(r, dict) else 0 for r in replies]

    # -- loss detection and rate limiting ------------------------------------------------------

    async def epochs(self, partitions: Sequence[tuple[str, int]]) -> list[str]:
        """The data epoch of each ``(queue, partition)``; a change means Redis may have lost
        writes there.

        A marker key per partition, created once (gone after FLUSHALL, a restart without
        persistence, or a cluster node replaced empty), plus the run id of the server that
        holds it: the one server, or in cluster mode the primary serving the marker's slot
        (new after any restart or failover, which may lose the last writes).
        """
        token = secrets.token_hex(8)
        keys = [self.keys.epoch(q, p) for q, p in partitions]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, token, nx=True)
                pipe.get(key)
            replies = await pipe.execute()
        servers = await self._run_ids(keys)
        return [f"{_text(v)}:{run_id}" for v, run_id in zip(replies[1::2], servers, strict=True)]

    async def _run_ids(self, keys: Sequence[str]) -> list[str]:
        """The run id of the server that holds each key."""
        if isinstance(self.redis, Redis):
            info: dict[str, Any] = await self.redis.info("server")
            return [str(info.get("run_id", ""))] * len(keys)
        nodes = [self.redis.get_node_from_key(key) for key in keys]
        run_ids: dict[str, str] = {}
        for node in nodes:
            if node is not None and node.name not in run_ids:
                info = await self.redis.info("server", target_nodes=node)
                run_ids[node.name] = str(info.get("run_id", ""))
        return [run_ids.get(node.name, "") if node is not None else "" for node in nodes]

    async def take_token(self, principal: str, rate: float, burst: int) -> float:
        """Take one rate-limit token; returns 0 when allowed, else seconds to wait."""
        allowed, wait_ms = await self._ratelimit(
            keys=[self.keys.rate_limit(principal)], args=[rate, burst]
        )
        return 0.0 if int(allowed) else max(int(wait_ms), 1) / 1000


def _args(ids: list[UUID], traceparents: Mapping[UUID, str] | None) -> list[str]:
    """dispatch.lua's arguments: ``"<uuid>"``, or ``"<uuid> <traceparent>"``."""
    if not traceparents:
        return [str(i) for i in ids]
    return [f"{i} {traceparents[i]}" if i in traceparents else str(i) for i in ids]


def _entries_by_stream(deliveries: Iterable[Delivery]) -> dict[str, list[Any]]:
    by_stream: dict[str, list[Any]] = defaultdict(list)
    for d in deliveries:
        by_stream[d.stream].append(d.entry_id)
    return by_stream


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_items(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str] | None]]]]:
    """XREADGROUP replies are a list under RESP2 and a dict under RESP3."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
    return [(stream, entries) for stream, entries in reply]
