"""The front gate: one pure ASGI middleware that checks what the headers alone can decide,
before any route runs or any body is read. In order:

1. ``Host`` must be one of ``CONVEYOR_ALLOWED_HOSTS`` (400; against DNS rebinding). The probes
   ``/healthz`` and ``/readyz`` are exempt: orchestrators call them by address.
2. On ``/v1`` and on the dashboard's data (``/ui/part/``; its pages and static files carry
   no data and are open): a missing or unknown API key is 401 (when keys are configured);
   the caller's :class:`Principal` is left in the scope for the routes.
3. With auth off, a state-changing request (POST, PUT, PATCH, DELETE) must carry a JSON
   ``Content-Type`` or an ``X-Requested-With`` header (415): a cross-site page can send
   neither without a CORS preflight, which this API never grants, so it cannot cancel jobs or
   replay the DLQ through the browser of someone running Conveyor locally. (With auth on, the
   key header plays that part.)
4. On those same paths: a query parameter given twice is 422; over the rate limit is 429.

The body limits (:class:`app.api.limits.BodyLimits`) come next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.auth import OPEN, Authenticator, secret_from
from app.api.errors import domain_response
from app.api.ratelimit import RateLimiter
from app.errors import BadRequest, ConveyorError, InvalidInput, Unavailable, UnsupportedMediaType
from app.jobs.principal import Principal
from app.streams.client import StreamClient

log = logging.getLogger(__name__)

PRINCIPAL = "conveyor.principal"  # the scope key of the caller's Principal
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROBES = frozenset({"/healthz", "/readyz"})
KEYED = ("/v1/", "/ui/part/")  # the paths that need a key (with ``/v1`` itself)
_WANTED = frozenset({b"host", b"authorization", b"x-api-key", b"content-type", b"x-requested-with"})


class HostAllowList:
    """``CONVEYOR_ALLOWED_HOSTS``: names (``localhost``), addresses (``127.0.0.1``,
    ``[::1]``), ``.example.com`` for a domain and its subdomains, or ``*`` for any."""

    def __init__(self, spec: str) -> None:
        entries = {e.strip().lower() for e in spec.split(",") if e.strip()}
        self.any = "*" in entries
        self.exact = frozenset(e for e in entries if not e.startswith("."))
        self.suffixes = tuple(e for e in entries if e.startswith("."))

    def allows(self, host: bytes | None) -> bool:
        if self.any:
            return True
        if not host:
            return False
        name = _without_port(host.decode("latin-1").lower())
        if name in self.exact:
            return True
        return any(name.endswith(s) or name == s[1:] for s in self.suffixes)


def _without_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_json(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _repeated_parameter(query_string: bytes) -> None:
    """Every query parameter of the API takes one value: a repeated one is a 422, not "the
    last one wins" (which would hide a client's mistake, e.g. two ``status`` filters)."""
    seen: set[str] = set()
    for name, _ in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            raise InvalidInput(
                "a query parameter is given more than once",
                details=[
                    {"loc": ["query", name], "msg": "given more than once", "type": "repeated"}
                ],
            )
        seen.add(name)


class Gate:
    """Pure ASGI middleware: see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: Authenticator,
        hosts: HostAllowList,
        limiter: RateLimiter,
        stream: Callable[[], StreamClient],
    ) -> None:
        self.app = app
        self.auth = auth
        self.hosts = hosts
        self.limiter = limiter
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self._check(scope)
        except ConveyorError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _WANTED and name not in headers:
                headers[name] = value
        path: str = scope["path"]
        if path not in PROBES and not self.hosts.allows(headers.get(b"host")):
            raise BadRequest(
                "the Host header names no host this server answers to"
                " (CONVEYOR_ALLOWED_HOSTS lists them)",
                code="bad_host",
            )
        v1 = path == "/v1" or path.startswith(KEYED)
        if v1:
            scope[PRINCIPAL] = await self._principal(headers)
        if scope["method"] in STATE_CHANGING and not self.auth.enabled:
            _require_non_simple(headers)
        if v1:
            if scope["query_string"]:
                _repeated_parameter(scope["query_string"])
            if self.limiter.enabled:
                await self.limiter.take(self.stream(), self._identity(scope))

    async def _principal(self, headers: dict[bytes, bytes]) -> Principal:
        if not self.auth.enabled:
            return OPEN
        authorization = headers.get(b"authorization")
        api_key = headers.get(b"x-api-key")
        secret = secret_from(
            authorization.decode("latin-1") if authorization else None,
            api_key.decode("latin-1") if api_key else None,
        )
        try:
            return await self.auth.principal(secret)
        except ConveyorError:
            raise
        except Exception as exc:  # the key id salt could not be loaded from Postgres
            log.warning("API key id salt unavailable: %s", type(exc).__name__)
            raise Unavailable(
                "a backing service is unavailable; retry later (with the same Idempotency-Key)"
            ) from exc

    @staticmethod
    def _identity(scope: Scope) -> str:
        principal: Principal = scope[PRINCIPAL]
        if principal.scope:
            return f"key:{principal.scope}"
        client = scope.get("client")
        return f"ip:{client[0] if client else 'unknown'}"

    @staticmethod
    async def _refuse(exc: ConveyorError, scope: Scope, receive: Receive, send: Send) -> None:
        await domain_response(exc)(scope, receive, send)


def _require_non_simple(headers: dict[bytes, bytes]) -> None:
    if _is_json(headers.get(b"content-type")) or b"x-requested-with" in headers:
        return
    raise UnsupportedMediaType(
        "a state-changing request must send Content-Type: application/json"
        " or an X-Requested-With header",
        details={"accepted": ["application/json"], "or_header": "X-Requested-With"},
    )
