"""The Redis client every process uses, with timeouts that fit its blocking reads."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.settings import Settings

RedisClient = Redis | RedisCluster


def create_redis(settings: Settings, *, block_seconds: float = 0.0) -> RedisClient:
    """A client whose socket timeout outlasts the longest blocking read it will make."""
    timeout = settings.redis_timeout_seconds + block_seconds
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "health_check_interval": 30,
    }
    if settings.redis_cluster:
        # A MOVED reply (a slot was resharded to another master) patches the slot table from
        # the reply alone. redis-py's default also rebuilds the whole table every fifth MOVED
        # by closing every connection, under the commands still in flight on them, which then
        # fail with errors of no known kind (AttributeError, RuntimeError).
        options["reinitialize_steps"] = 0
        return cast(RedisClient, RedisCluster.from_url(settings.redis_url, **options))
    # After a Redis restart every pooled connection is dead: retry once on a new one, so
    # the first command on each does not fail. A refused connection fails again at once; a
    # timeout (a hung server) is not retried, so a call never waits more than one timeout.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    options |= {"retry": retry, "retry_on_error": [RedisConnectionError]}
    return Redis.from_url(settings.redis_url, **options)


__all__ = ["RedisClient", "create_redis"]
