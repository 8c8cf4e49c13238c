"""``POST /v1/jobs`` without the router: the hottest route, called straight from the innermost
middleware.

The endpoint (:func:`app.api.routes.jobs.submit_job`) already takes the bare ``Request`` and
returns its ``Response``: it has no parameters for FastAPI to solve and no response model to
serialise. What the router adds around it on every request is matching the path against every
route, an exception layer of its own, the exit stack for dependencies with ``yield``, and the
request/response wrappers; in the API's profile under the single-POST load that was about a
fifth of its CPU. This middleware takes exactly that request (method, path, no root path)
past all of it, after the gate, the body limits and the metrics, which every request still
goes through. Everything else, ``/v1/jobs/`` included, takes the router as before.

Errors are answered by the application's own exception handlers, looked up as Starlette's
exception layer looks them up; an exception none of them takes (the ``Exception`` handler is
Starlette's last resort, as on the routed path) propagates to the server-error middleware.
The route's OpenAPI entry is the registered route's, and ``scope["route"]`` is set to it, so
the metrics label the request by its template as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Any]

PATH = "/v1/jobs"


class SubmitFastPath:
    def __init__(
        self,
        app: ASGIApp,
        *,
        endpoint: Endpoint,
        routes: Callable[[], list[Any]],
        handlers: Callable[[], Mapping[Any, Handler]],
    ) -> None:
        self.app = app
        self.endpoint = endpoint
        self.routes = routes  # the application's routes (read once, on the first request)
        self.handlers = handlers  # the application's exception handlers (likewise)
        self._route: APIRoute | None = None
        self._by_type: dict[type, Handler] = {}
        self._by_status: dict[int, Handler] = {}
        self._ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != PATH
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        if not self._ready:
            self._prepare()
        if self._route is None:  # no such route registered: the router answers
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route
        scope["endpoint"] = self.endpoint
        scope["path_params"] = {}
        request = Request(scope, receive)
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
            exc.__traceback__ = None  # a reused exception would pile up tracebacks
        await response(scope, receive, send)

    def _prepare(self) -> None:
        for route in self.routes():
            if (
                isinstance(route, APIRoute)
                and route.path == PATH
                and "POST" in (route.methods or ())
                and route.endpoint is self.endpoint
            ):
                self._route = route
        for key, handler in self.handlers().items():
            if isinstance(key, int):
                if key != 500:
                    self._by_status[key] = handler
            elif key is not Exception:  # the server-error middleware's, as for the router
                self._by_type[key] = handler
        self._ready = True

    def _handler(self, exc: Exception) -> Handler | None:
        if isinstance(exc, HTTPException) and exc.status_code in self._by_status:
            return self._by_status[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self._by_type:
                return self._by_type[cls]
        return None
