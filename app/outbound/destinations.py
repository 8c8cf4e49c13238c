"""Where Conveyor may connect (``http.request`` and completion callbacks): the allow-list and
the address policy (SSRF guard).

A host must be listed in ``CONVEYOR_HTTP_ALLOWED_HOSTS``; a host matched only by a wildcard
must resolve to public addresses only (IPv4-mapped, 6to4 and NAT64 wrappers are looked into).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from functools import lru_cache

import httpx

from app.errors import PermanentError

log = logging.getLogger(__name__)

NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedDestination(PermanentError):
    """The URL's host is not allowed, or resolves to a refused address."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"blocked_destination: {reason}")


class HttpRequestFailed(Exception):
    """A retryable failure: 5xx, 408, 429 or a network error."""


# -- the destination policy -----------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    host: str  # normalised; "*" any host; "*.example.com" its subdomains
    port: int | None  # None: any port

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def host_of(url: httpx.URL) -> str:
    """The host as sent on the wire: lower-case, IDNA-encoded, IPv6 without brackets."""
    return url.raw_host.decode("ascii")


def _normal_host(host: str) -> str:
    return host_of(httpx.URL(f"http://[{host}]/" if ":" in host else f"http://{host}/"))


def _parse_entry(entry: str) -> Allowed:
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif entry.count(":") == 1:
        host, _, raw_port = entry.partition(":")
        port = int(raw_port)
    if host == "*":
        return Allowed("*", port)
    wildcard = host.startswith("*.")
    if "*" in host[2:] or (host.startswith("*") and not wildcard):
        raise ValueError(f"bad wildcard {entry!r}")
    name = _normal_host(host[2:] if wildcard else host)
    return Allowed(f"*.{name}" if wildcard else name, port)


@lru_cache(maxsize=8)
def allowed_hosts(spec: str) -> tuple[Allowed, ...]:
    """Parse ``CONVEYOR_HTTP_ALLOWED_HOSTS``; a malformed entry allows nothing."""
    entries = []
    for raw in spec.split(","):
        if raw.strip():
            try:
                entries.append(_parse_entry(raw.strip().lower()))
            except (ValueError, httpx.InvalidURL):
                log.warning("ignoring malformed CONVEYOR_HTTP_ALLOWED_HOSTS entry %r", raw)
    return tuple(entries)


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 wrappers."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None and not is_public(inner):
            return False
    refused = (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )
    return ip.is_global and not refused


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise HttpRequestFailed(f"cannot resolve {host}: {exc}") from exc
    found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return list(dict.fromkeys(found))


def http_url(value: str) -> str:
    """An http:// or https:// URL with a host and no credentials (a pydantic validator)."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("the URL must be http:// or https:// with a host")
    if url.userinfo:
        raise ValueError("credentials in the URL are not allowed; send a header")
    return value


def listed(url: httpx.URL, allowed: tuple[Allowed, ...]) -> bool:
    """Whether the allow-list names the URL's host and port (no DNS: :func:`destination` also
    checks the addresses when connecting)."""
    if url.scheme not in ("http", "https") or not url.host or url.userinfo:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    return any(a.matches(host_of(url), port) for a in allowed)


async def destination(url: httpx.URL, allowed: tuple[Allowed, ...]) -> IPAddress:
    """The checked address to connect to for ``url``, or :class:`BlockedDestination`."""
    if url.scheme not in ("http", "https") or not url.host or url.userinfo:
        raise BlockedDestination(f"{url.scheme}:// URLs are not allowed")
    host, port = host_of(url), url.port or (443 if url.scheme == "https" else 80)
    matching = [a for a in allowed if a.matches(host, port)]
    if not matching:
        raise BlockedDestination(f"{host}:{port} is not in CONVEYOR_HTTP_ALLOWED_HOSTS")
    addresses = await resolve(host, port)
    if not addresses:
        raise HttpRequestFailed(f"{host} has no address")
    listed_by_name = any(not a.host.startswith("*") for a in matching)
    if not listed_by_name:
        refused = [str(ip) for ip in addresses if not is_public(ip)]
        if refused:
            raise BlockedDestination(f"{host} resolves to non-public {', '.join(refused)}")
    return addresses[0]
