"""Per-key rate limiting: a token bucket in Redis, applied to ``/v1`` by the gate.

``CONVEYOR_RATE_LIMIT_PER_SECOND`` tokens per second refill a bucket of
``CONVEYOR_RATE_LIMIT_BURST`` (at least one second's worth); 0 turns limiting off (the
default). The bucket is per API key (``Principal.scope``), or per client address when auth is
off. Over the limit: 429 with ``Retry-After``. Redis holds no job truth, so when it cannot be
reached the limiter fails open, logs a warning, and leaves Redis alone for a few seconds.
"""

from __future__ import annotations

import logging
import math
import time

from redis.exceptions import RedisError

from app.errors import RateLimited
from app.streams.client import StreamClient

log = logging.getLogger(__name__)

FAIL_OPEN_SECONDS = 5.0


class RateLimiter:
    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = max(burst, math.ceil(per_second), 1)
        self._open_until = 0.0  # monotonic time until which Redis is skipped after a failure

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    async def take(self, stream: StreamClient, identity: str) -> None:
        """Take one token for ``identity``; raise :class:`RateLimited` when there is none."""
        if not self.enabled or time.monotonic() < self._open_until:
            return
        try:
            wait = await stream.take_token(identity, self.per_second, self.burst)
        except (RedisError, OSError) as exc:  # ConnectionError and TimeoutError are OSErrors
            self._open_until = time.monotonic() + FAIL_OPEN_SECONDS
            log.warning(
                "rate limiter cannot reach Redis (%s); not limiting for %.0f s",
                type(exc).__name__,
                FAIL_OPEN_SECONDS,
            )
            return
        if wait > 0:
            raise RateLimited("rate limit exceeded; retry later", retry_after=wait)
