"""The built-in ``http.request`` job type: Conveyor calls an HTTP endpoint for you.

Teams without Python handlers point a job at their own service, as with Cloud Tasks HTTP
targets. Outcome of one attempt:

- 2xx: success; the result is ``{"status", "headers", "body", "body_truncated"}`` (a few
  response headers; the body as text, cut at 64 KiB).
- 429 or 503 with a ``Retry-After`` header (seconds or an HTTP date): the job waits that
  long without spending an attempt (``RetryLater``; at least 1 s, at most
  ``MAX_RETRY_AFTER_SECONDS``, one hour; and at most ``CONVEYOR_MAX_DEFERRALS`` times).
- 5xx, 408, 429 (without a usable ``Retry-After``), and network errors (refused, reset, DNS,
  timeout): the attempt fails and the job retries with backoff.
- any other status (4xx, an unusable redirect): permanent failure, no further attempts.

Every request carries ``Conveyor-Job-Id`` and ``Conveyor-Attempt``, and the Standard Webhooks
headers (app.outbound.signing): ``webhook-id`` = ``{job_id}_{attempt}``, ``webhook-timestamp``
(Unix seconds) and, when ``CONVEYOR_HTTP_SIGNING_SECRET`` is set, ``webhook-signature:
v1,<base64>``, the HMAC-SHA256 of ``"{webhook-id}.{webhook-timestamp}.{body}"`` where body is
the request body exactly as sent (empty without one). Receivers verify it with any Standard
Webhooks library (which also rejects stale timestamps); the id lets them deduplicate
at-least-once deliveries.

SSRF guard: nothing is called unless ``CONVEYOR_HTTP_ALLOWED_HOSTS`` (comma-separated) lists
the host: ``host`` (any port), ``host:port``, ``[v6]:port``, ``*.domain`` (its subdomains) or
``*`` (any host). Every address the host resolves to is checked; loopback, private,
link-local, shared, reserved, multicast and unspecified addresses (IPv4-mapped, 6to4 and NAT64
forms included; decimal or hex spellings resolve to the same addresses) are refused unless
the host itself is listed by name, not by a wildcard. The request then goes to the checked
address with the original ``Host`` header (and TLS server name), so DNS cannot rebind it.
Redirects are followed by hand, at most 5, each hop checked the same way. Refusals fail the
job permanently with ``blocked_destination``. Proxy variables of the environment are ignored.

Redirects to another origin (scheme, host or port): from the first such hop on, the request
carries none of the headers the job set (only Conveyor's ``User-Agent``, the
``Content-Type`` of a body that a 307/308 re-sends, ``Conveyor-Job-Id``, ``-Attempt``,
``webhook-id`` and ``webhook-timestamp``) and no ``webhook-signature``, so a redirect target
elsewhere receives no
credential or signature it could replay. Hops on the job's own origin keep both.

Every request asks for ``Accept-Encoding: identity`` and the body is read as received, never
decompressed: the 64 KiB cap is on bytes received, so a compressed "bomb" cannot inflate the
worker.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.errors import PermanentError, RetryLater
from app.jobs.registry import JobContext, job_type
from app.outbound import signing
from app.outbound.destinations import (
    HttpRequestFailed,
    IPAddress,
    allowed_hosts,
    destination,
    host_of,
    http_url,
)
from app.settings import get_settings

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRYABLE = frozenset({408, 429})
DEFERRING = frozenset({429, 503})  # with Retry-After: wait as told, spending no attempt
MAX_RETRY_AFTER_SECONDS = 3600.0
MIN_RETRY_AFTER_SECONDS = 1.0
DELTA_SECONDS = re.compile(r"^\d+$")
KEPT_HEADERS = ("content-type", "content-length", "location", "etag", "retry-after")
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "accept-encoding",
    }
)
SET_BY_US = ("conveyor-", "webhook-")  # header prefixes a job may not set
USER_AGENT = "Conveyor (http.request)"
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")


class HttpRequestPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="An http:// or https:// URL.")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict, max_length=64)
    body: str | dict[str, Any] | None = Field(
        default=None, description="Sent as is (a string) or as JSON (an object)."
    )
    timeout_seconds: float = Field(
        default=30, gt=0, le=300, allow_inf_nan=False, description="For the whole exchange."
    )

    _http_url = field_validator("url")(http_url)

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, str]) -> dict[str, str]:
        lowered = [name.lower() for name in value]
        if len(set(lowered)) != len(lowered):
            raise ValueError("a header is given twice")
        for name, text in value.items():
            if not TOKEN.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in RESERVED_HEADERS or name.lower().startswith(SET_BY_US):
                raise ValueError(f"header {name!r} is set by Conveyor")
            if len(text) > 8192 or any(c in text for c in "\r\n\x00"):
                raise ValueError(f"invalid value for header {name!r}")
        return value


# -- the exchange -------------------------------------------------------------------------------


def _encode(payload: HttpRequestPayload) -> tuple[bytes, str | None]:
    if payload.body is None:
        return b"", None
    if isinstance(payload.body, str):
        return payload.body.encode(), "text/plain; charset=utf-8"
    return json.dumps(payload.body, separators=(",", ":")).encode(), "application/json"


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


@dataclass
class Request:
    """One hop. ``headers`` are the job's own (plus User-Agent and Content-Type); ``trusted``
    stays true while every hop so far was on the job's origin: only then do the job's headers
    and the signature go out."""

    method: str
    url: httpx.URL
    headers: dict[str, str]
    body: bytes
    trusted: bool = True

    def sign(self, ctx: JobContext, secret: str | None) -> dict[str, str]:
        message_id = f"{ctx.job_id}_{ctx.attempt}"
        return {
            **self.headers,
            "Accept-Encoding": "identity",
            "Conveyor-Job-Id": str(ctx.job_id),
            "Conveyor-Attempt": str(ctx.attempt),
            **signing.headers(message_id, self.body, secret, signed=self.trusted),
        }

    def redirected(self, status: int, location: str) -> Request:
        """The next hop. Leaving the job's origin drops every header the job set (and, for
        good, the signature): a redirect target elsewhere gets nothing it could reuse."""
        url = self.url.join(location)
        trusted = self.trusted and _origin(url) == _origin(self.url)
        headers = dict(self.headers)
        if not trusted:
            kept = {"user-agent", "content-type"}
            headers = {k: v for k, v in headers.items() if k.lower() in kept}
            headers["User-Agent"] = USER_AGENT
        if status == 303 or (status in (301, 302) and self.method == "POST"):
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            return Request("GET", url, headers, b"", trusted)
        return Request(self.method, url, headers, self.body, trusted)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool


async def exchange(
    client: httpx.AsyncClient, request: Request, ip: IPAddress, headers: dict[str, str]
) -> Reply:
    """Send to the checked address, with the URL's own Host header and TLS server name."""
    url = request.url
    headers = {**headers, "Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": host_of(url)} if url.scheme == "https" else {}
    wire = client.build_request(
        request.method,
        url.copy_with(host=str(ip)),
        headers=headers,
        content=request.body or None,
        extensions=extensions,
    )
    response = await client.send(wire, stream=True)
    try:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():  # never decoded: the cap is on bytes received
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                break
    finally:
        await response.aclose()
    body = b"".join(chunks)
    kept = {k: response.headers[k] for k in KEPT_HEADERS if k in response.headers}
    return Reply(
        response.status_code, kept, body[:MAX_RESPONSE_BYTES], len(body) > MAX_RESPONSE_BYTES
    )


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), within
    1 s .. MAX_RETRY_AFTER_SECONDS; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if DELTA_SECONDS.match(value):
        seconds = float(value[:12])  # beyond 12 digits it is capped anyway
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    return min(max(seconds, MIN_RETRY_AFTER_SECONDS), MAX_RETRY_AFTER_SECONDS)


def _outcome(reply: Reply, host: str) -> dict[str, Any]:
    if 200 <= reply.status < 300:
        return {
            "status": reply.status,
            "headers": reply.headers,
            "body": _text(reply.body),
            "body_truncated": reply.truncated,
        }
    message = f"HTTP {reply.status} from {host}: {_text(reply.body[:300])}"
    if reply.status in DEFERRING:
        wait = retry_after(reply.headers.get("retry-after"), time.time())
        if wait is not None:
            raise RetryLater(wait, f"{message} (Retry-After: {wait:g}s)")
    if reply.status >= 500 or reply.status in RETRYABLE:
        raise HttpRequestFailed(message)
    raise PermanentError(message)


async def _follow(client: httpx.AsyncClient, first: Request, ctx: JobContext) -> dict[str, Any]:
    settings = get_settings()
    allowed = allowed_hosts(settings.http_allowed_hosts)
    request = first
    for _ in range(MAX_REDIRECTS + 1):
        ip = await destination(request.url, allowed)
        reply = await exchange(client, request, ip, request.sign(ctx, settings.http_signing_secret))
        location = reply.headers.get("location")
        if reply.status not in REDIRECTS or not location:
            return _outcome(reply, host_of(request.url))
        try:
            request = request.redirected(reply.status, location)
        except httpx.InvalidURL as exc:
            raise PermanentError(f"HTTP {reply.status} to an invalid location") from exc
    raise PermanentError(f"more than {MAX_REDIRECTS} redirects")


@job_type("http.request", timeout_seconds=330)
async def http_request(payload: HttpRequestPayload, ctx: JobContext) -> dict[str, Any]:
    """Calls `url`: 2xx succeeds; 429 or 503 with Retry-After waits as told without spending
    an attempt; 5xx, 408, 429 and network errors retry; other statuses fail permanently.
    Off unless CONVEYOR_HTTP_ALLOWED_HOSTS lists the host. Each request carries
    Conveyor-Job-Id, Conveyor-Attempt and the Standard Webhooks headers webhook-id
    ("{job_id}_{attempt}"), webhook-timestamp and webhook-signature (v1, keyed with
    CONVEYOR_HTTP_SIGNING_SECRET). A redirect to another origin gets neither the signature nor
    the job's headers. Responses are not decompressed (Accept-Encoding: identity)."""
    body, content_type = _encode(payload)
    headers = {"User-Agent": USER_AGENT, **payload.headers}
    if content_type and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = content_type
    request = Request(payload.method, httpx.URL(payload.url), headers, body)
    timeout = httpx.Timeout(payload.timeout_seconds)
    try:
        async with (
            asyncio.timeout(payload.timeout_seconds),
            httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client,
        ):
            return await _follow(client, request, ctx)
    except TimeoutError as exc:
        raise HttpRequestFailed(f"no answer within {payload.timeout_seconds:g}s") from exc
    except httpx.TransportError as exc:
        raise HttpRequestFailed(f"{type(exc).__name__}: {exc}") from exc
