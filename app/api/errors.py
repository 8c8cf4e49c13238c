"""Error → HTTP status, in one table (:data:`TABLE`), which also documents the answers in the
OpenAPI document (:data:`ERRORS`). Every error body is ``{"error", "message", "details"}``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
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
from app.jobs.schemas import ErrorBody

log = logging.getLogger(__name__)

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}


@dataclass(frozen=True)
class _Answer:
    status: int
    description: str  # for the OpenAPI document
    headers: dict[str, Any] | None = None


# The one table: each domain error's status code and how the OpenAPI document describes it.
TABLE: dict[type[errors.ConveyorError], _Answer] = {
    errors.BadRequest: _Answer(
        400,
        "Malformed request framing (e.g. a bad Content-Length); or a Host header not in"
        " CONVEYOR_ALLOWED_HOSTS (`bad_host`)",
    ),
    errors.Unauthenticated: _Answer(
        401,
        "No API key, or an unknown one",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    errors.Forbidden: _Answer(403, "The key's role may not do this"),
    errors.NotFound: _Answer(404, "No such job (or not yours)"),
    errors.Conflict: _Answer(409, "Conflicts with the job's state or an earlier request"),
    errors.PayloadTooLarge: _Answer(413, "Body larger than CONVEYOR_MAX_PAYLOAD_BYTES"),
    errors.UnsupportedMediaType: _Answer(
        415,
        "Body is not application/json; or, with auth off, a state-changing request with"
        " neither that type nor an X-Requested-With header",
    ),
    errors.InvalidInput: _Answer(422, "Invalid input; nothing was written"),
    errors.RateLimited: _Answer(429, "Rate limit exceeded", _RETRY_AFTER),
    errors.Unavailable: _Answer(
        503, "Postgres or Redis unreachable; nothing was written", _RETRY_AFTER
    ),
}
STATUS: dict[type[errors.ConveyorError], int] = {cls: a.status for cls, a in TABLE.items()}
# ``responses=ERRORS`` on a route documents every error answer it may give.
ERRORS: dict[int | str, dict[str, Any]] = {
    a.status: {"model": ErrorBody, "description": a.description}
    | ({"headers": a.headers} if a.headers else {})
    for a in TABLE.values()
}
RETRY_AFTER_SECONDS = "2"


def unauthenticated_headers() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="conveyor"'}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": code, "message": message, "details": jsonable_encoder(details)}
    return JSONResponse(body, status_code=status, headers=headers)


def domain_response(exc: errors.ConveyorError) -> JSONResponse:
    """The answer to a domain error (also sent by the middlewares, which run before routing)."""
    status = STATUS.get(type(exc), 400)
    headers: dict[str, str] = {}
    if isinstance(exc, errors.Unauthenticated):
        headers.update(unauthenticated_headers())
    if isinstance(exc, errors.PayloadTooLarge):  # the rest of the body is left unread
        headers["Connection"] = "close"
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, errors.Unavailable):
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    if isinstance(exc, errors.PayloadTooLarge):
        headers["Connection"] = "close"  # the rest of the body was not read
    return error_response(status, exc.code, exc.message, exc.details, headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ConveyorError)
    return domain_response(exc)


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


UNDEFINED_TABLE = "42P01"


async def _database(request: Request, exc: Exception) -> JSONResponse:
    """A database error, SQLAlchemy-wrapped or raw asyncpg, by its SQLSTATE class: Postgres
    refused a value the validators let through (the request is at fault, a retry would not
    help: 422, nothing written, the transaction rolled back); it refused the statement itself
    (our fault: 500), unless a table is missing (the schema was never migrated: 503); otherwise
    the database is unreachable or busy (503)."""
    refusal = db_errors.refusal(exc)
    if refusal == "value":
        log.warning("Postgres refused a value: %s", db_errors.describe(exc))
        return error_response(422, "invalid", "a value in the request cannot be stored")
    if db_errors.sqlstate(exc) == UNDEFINED_TABLE:  # not migrated: the operator's to fix
        log.error("the database has no Conveyor tables: run `conveyor migrate`")
        return error_response(
            503,
            "not_migrated",
            "the database schema is not migrated; an operator must run `conveyor migrate`",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
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
