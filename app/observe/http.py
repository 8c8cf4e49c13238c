"""HTTP metrics of the API, as a pure ASGI middleware (outermost, so refusals by the gate
count too): requests by route template, method and status class; latency by route template;
429s; body rejections (413, 415). Label values are bounded: the route's template (not the
path), ``<unmatched>`` for a path no route serves, and ``other`` for an unusual method.
"""

from __future__ import annotations

import time

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observe import families as f
from app.observe.tally import TALLY

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"


class HttpMetrics:
    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

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
        if route is None:  # refused before routing (the gate): find the route it was for
            for candidate in self.routes:
                match, _ = candidate.matches(scope)
                if match != Match.NONE:
                    route = candidate
                    break
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else UNMATCHED
