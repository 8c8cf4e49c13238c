"""The fast path of ``POST /v1/jobs`` (app/api/fastpath.py): which requests take it, and that
its errors are the application's.

Every API test that submits a job goes through it too, since :func:`app.main.create_app`
installs it; these tests pin down what it takes and what it leaves to the router.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from app.api.fastpath import PATH, SubmitFastPath
from app.errors import Conflict


class Boom(Exception):
    pass


def _app() -> tuple[FastAPI, list[str]]:
    """An application with the submit route and a catch-all, recording what reached the
    router."""
    routed: list[str] = []
    app = FastAPI()

    async def submit(request: Request) -> Response:
        body = await request.body()
        if body == b"conflict":
            raise Conflict("already there")
        if body == b"boom":
            raise Boom("unhandled")
        route = request.scope["route"].path
        return JSONResponse({"via": "endpoint", "route": route}, status_code=202)

    app.add_api_route(PATH, submit, methods=["POST"])

    @app.api_route("/{rest:path}", methods=["GET", "POST"])
    async def other(request: Request) -> dict[str, Any]:
        return {"via": "router"}

    async def conflict(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "conflict"}, status_code=409)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "internal"}, status_code=500)

    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(Exception, unexpected)

    async def recorder(request: Request, call_next: Any) -> Response:
        """Between the fast path and the router: sees what the fast path passed on."""
        routed.append(f"{request.method} {request.url.path}")
        response: Response = await call_next(request)
        return response

    app.middleware("http")(recorder)
    app.add_middleware(
        SubmitFastPath,
        endpoint=submit,
        routes=lambda: app.routes,
        handlers=lambda: app.exception_handlers,
    )
    return app, routed


async def _client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_post_jobs_is_answered_by_its_endpoint_with_the_route_in_the_scope() -> None:
    app, routed = _app()
    async with await _client(app) as client:
        response = await client.post(PATH, content=b"{}")
    assert response.status_code == 202
    assert response.json() == {"via": "endpoint", "route": PATH}
    assert routed == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", PATH), ("POST", f"{PATH}/batch"), ("POST", f"{PATH}/x"), ("POST", "/v1/job")],
)
async def test_every_other_request_goes_to_the_router(method: str, path: str) -> None:
    app, routed = _app()
    async with await _client(app) as client:
        response = await client.request(method, path)
    assert response.json() == {"via": "router"}
    assert routed == [f"{method} {path}"]


async def test_a_handled_error_is_answered_by_the_applications_handler() -> None:
    app, _ = _app()
    async with await _client(app) as client:
        response = await client.post(PATH, content=b"conflict")
    assert (response.status_code, response.json()) == (409, {"error": "conflict"})


async def test_an_unhandled_error_reaches_the_server_error_handler() -> None:
    app, _ = _app()
    async with await _client(app) as client:
        response = await client.post(PATH, content=b"boom")
    assert (response.status_code, response.json()) == (500, {"error": "internal"})


async def test_a_route_that_is_not_the_submit_endpoint_is_left_to_the_router() -> None:
    """Another function registered at the path (a test app, a plugin) is not bypassed."""
    app = FastAPI()

    async def mine(request: Request) -> Response:
        return JSONResponse({"via": "router"})

    async def submit(request: Request) -> Response:
        raise AssertionError("not this one")

    app.add_api_route(PATH, mine, methods=["POST"])
    app.add_middleware(
        SubmitFastPath,
        endpoint=submit,
        routes=lambda: app.routes,
        handlers=lambda: app.exception_handlers,
    )
    async with await _client(app) as client:
        response = await client.post(PATH)
    assert response.json() == {"via": "router"}
