"""What this process knows about a job's life after it finishes: how long it is kept
(:class:`app.jobs.retention.Policy`) and where its completion callback may go.

The API (``create_app``) and each worker install it once from their settings and registry;
the ``Job`` schema reads it to show ``result_expires_at``, the submit path to check a
``callback_url``. Until something is installed, it comes from :func:`get_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from app.errors import InvalidInput
from app.jobs.retention import Policy
from app.outbound.destinations import Allowed, allowed_hosts, listed
from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from app.jobs.registry import Registry


@dataclass(frozen=True)
class Lifecycle:
    retention: Policy
    callback_hosts: tuple[Allowed, ...]

    @classmethod
    def of(cls, settings: Settings, registry: Registry | None = None) -> Lifecycle:
        return cls(Policy.of(settings, registry), allowed_hosts(settings.http_allowed_hosts))

    def check_callback(self, url: str | None) -> None:
        """A ``callback_url`` whose host CONVEYOR_HTTP_ALLOWED_HOSTS does not list is a 422
        (its addresses are checked again at each delivery, as for ``http.request``)."""
        if url is not None and not listed(httpx.URL(url), self.callback_hosts):
            raise InvalidInput(
                "callback_url: the host is not in CONVEYOR_HTTP_ALLOWED_HOSTS",
                details={"callback_url": url},
            )


_installed: list[Lifecycle] = []


def install(settings: Settings, registry: Registry | None = None) -> Lifecycle:
    lifecycle = Lifecycle.of(settings, registry)
    _installed[:] = [lifecycle]
    return lifecycle


def current() -> Lifecycle:
    if not _installed:
        _installed.append(Lifecycle.of(get_settings()))
    return _installed[0]
