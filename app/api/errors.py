"""Error → HTTP status, in one table. Every error body is ``{"error", "message", "details"}``."""

from __future__ import annotations

import logging
import math
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors
from app.db import errors as db_errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.ConveyorError], int] = {
    errors.InvalidInput: 422,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
}
RETRY_AFTER_SECONDS = "2"


def unauthenticated_headers() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="conveyor"'}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": code, "message": message, "details": jsonable_encoder(details)}
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ConveyorError)
    status = STATUS.get(type(exc), 400)
    headers: dict[str, str] = {}
    if isinstance(exc, errors.Unauthenticated):
        headers.update(unauthenticated_headers())
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, errors.Unavailable):
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    return error_response(status, exc.code, exc.message, exc.details, headers)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return error_response(422, "invalid", "request validation failed", details)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(
        exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
    )


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("backend unavailable: %s", type(exc).__name__)
    return error_response(
        503,
        "unavailable",
        "a backing service is unavailable; retry later (with the same Idempotency-Key)",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error")


async def _database(request: Request, exc: Exception) -> JSONResponse:
    """A database error, SQLAlchemy-wrapped or raw asyncpg, by its SQLSTATE class: Postgres
    refused a value the validators let through (the request is at fault, a retry would not
    help: 422, nothing written, the transaction rolled back); it refused the statement itself
    (our fault: 500); otherwise the database is unreachable or busy (503)."""
    refusal = db_errors.refusal(exc)
    if refusal == "value":
        log.warning("Postgres refused a value: %s", db_errors.describe(exc))
        return error_response(422, "invalid", "a value in the request cannot be stored")
    if refusal == "statement":
        return await _unexpected(request, exc)
    return await _unavailable(request, exc)


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.ConveyorError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    # Every DBAPIError subclass (DataError, OperationalError, InterfaceError, ...) and every
    # raw asyncpg error goes through one classification.
    for db_type in (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError):
        app.add_exception_handler(db_type, _database)
    for exc_type in (
        PoolTimeout,
        RedisError,
        ConnectionError,
        OSError,
        TimeoutError,
    ):
        app.add_exception_handler(exc_type, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
