"""HTTP metrics of the API, as a pure ASGI middleware (outermost, so refusals by the gate
count too): requests by route template, method and status class; latency by route template;
429s; body rejections (413, 415). Label values are bounded: the route's template (not the
path), ``<unmatched>`` for a path no route serves, and ``other`` for an unusual method.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observe import families as f
from app.observe.tally import TALLY

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"


class HttpMetrics:
    def __init__(self, app: ASGIApp, *, templates: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self.templates = templates  # the route templates (from the OpenAPI document)
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status, time.perf_counter() - began)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = self._template(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        TALLY.count(f.HTTP_REQUESTS, (route, method, f"{status // 100}xx"))
        TALLY.observe(f.HTTP_LATENCY, (route, method), seconds)
        if status == 429:
            TALLY.count(f.HTTP_RATE_LIMITED, (route,))
        elif status in (413, 415):
            TALLY.count(f.HTTP_BODY_REJECTED, (route, str(status)))

    def _template(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        # Refused before routing (the gate, the body limits): the template the path is for.
        for pattern, template in self._compiled():
            if pattern.fullmatch(scope["path"]):
                return template
        return UNMATCHED

    def _compiled(self) -> list[tuple[re.Pattern[str], str]]:
        if self._patterns is None:
            templates = sorted(set(self.templates()), key=lambda t: (t.count("{"), t))
            self._patterns = [
                (re.compile(re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(t))), t) for t in templates
            ]
        return self._patterns
