"""The domain error tree: every error the API answers with is one of these. The API maps each
class to one status code in one table (``app/api/errors.py``), which the middlewares use too.

::

    ConveyorError
    ├── BadRequest               400  malformed framing (an invalid Content-Length), or
    │                                 a Host not in CONVEYOR_ALLOWED_HOSTS (code ``bad_host``)
    ├── NotFound                 404  unknown job / not in the DLQ
    ├── InvalidInput             422  unknown type, payload failing its schema, bad filter,
    │                                 a body that is not storable JSON
    ├── Conflict                 409  idempotency key reused with another request,
    │                                 cancel of a running or finished job
    ├── Unauthenticated          401  missing or unknown API key
    ├── Forbidden                403  key lacks the role for the operation
    ├── PayloadTooLarge          413  body over CONVEYOR_MAX_PAYLOAD_BYTES
    ├── UnsupportedMediaType     415  a body that is not JSON; with auth off, a state-changing
    │                                 request with neither a JSON type nor X-Requested-With
    ├── RateLimited              429  carries ``retry_after``
    └── Unavailable              503  Postgres or Redis unreachable; nothing was written

    PermanentError               raised by a handler: fail the job now, skip remaining attempts
    RetryLater                   raised by a handler: run the job again after ``seconds``,
                                 without spending an attempt (see CONVEYOR_MAX_DEFERRALS)
"""

from __future__ import annotations

import math
from typing import Any

# The longest a single RetryLater may defer a job; longer requests are cut to this.
MAX_RETRY_LATER_SECONDS = 24 * 3600.0


class ConveyorError(Exception):
    """Base of every error the API turns into a 4xx/503 response."""

    code = "error"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:  # a finer name for the same status (the body's ``error``)
            self.code = code


class BadRequest(ConveyorError):
    code = "bad_request"


class NotFound(ConveyorError):
    code = "not_found"


class InvalidInput(ConveyorError):
    code = "invalid"


class Conflict(ConveyorError):
    code = "conflict"


class Unauthenticated(ConveyorError):
    code = "unauthenticated"


class Forbidden(ConveyorError):
    code = "forbidden"


class PayloadTooLarge(ConveyorError):
    code = "payload_too_large"


class UnsupportedMediaType(ConveyorError):
    code = "unsupported_media_type"


class RateLimited(ConveyorError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ConveyorError):
    code = "unavailable"


class PermanentError(Exception):
    """Raise from a handler to fail the job at once, without further attempts."""


class RetryLater(Exception):
    """Raise from a handler to run the job again after ``seconds`` without spending an attempt
    (a rate-limited or overloaded dependency: not the job's fault). The job waits as
    ``retrying`` with ``next_attempt_at``; its history shows a ``deferred`` event, not a
    failure. ``seconds`` is clamped to 0..MAX_RETRY_LATER_SECONDS (NaN counts as 0). After
    ``CONVEYOR_MAX_DEFERRALS`` deferrals of one job, each further one is a failed attempt."""

    def __init__(self, seconds: float, message: str | None = None) -> None:
        value = float(seconds)
        self.seconds = 0.0 if math.isnan(value) else min(max(value, 0.0), MAX_RETRY_LATER_SECONDS)
        super().__init__(message or f"retry in {self.seconds:g}s")
