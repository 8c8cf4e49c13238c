"""The body and header of ``POST /v1/jobs``, parsed without FastAPI's parameter machinery.

The hottest route takes only the ``Request``: its JSON is validated by pydantic-core in one
pass (:meth:`JobCreate.model_validate_json`), and a failure raises the same
``RequestValidationError``, with the same locations and wording, that a ``body: JobCreate``
parameter and an ``Idempotency-Key`` header parameter would. :data:`SUBMIT_OPENAPI` declares
both in the OpenAPI document, as those parameters would.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError

from app.jobs.schemas import JobCreate

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY = TypeAdapter(Annotated[str, Field(min_length=1, max_length=255)])

WAIT_DESCRIPTION = (
    "Wait up to this many seconds (0 < S <= 60) for the job to finish: answered as soon as it"
    " is terminal, or with its current state when the time runs out."
)
_POST_WAIT = WAIT_DESCRIPTION + " A job finished in time is answered with 200."
_WAIT = TypeAdapter(Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)])

SUBMIT_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "schema": {"description": _POST_WAIT, "title": "Wait", **_WAIT.json_schema()},
            "description": _POST_WAIT,
        },
        {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "required": False,
            "schema": {"title": IDEMPOTENCY_HEADER, **_KEY.json_schema()},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}},
    },
}


def _located(exc: ValidationError, prefix: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{**e, "loc": (*prefix, *e["loc"])} for e in exc.errors(include_url=False)]


def _body(raw: bytes) -> tuple[JobCreate | None, list[dict[str, Any]]]:
    if not raw:
        return None, [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    try:
        return JobCreate.model_validate_json(raw), []
    except ValidationError:
        pass
    try:  # FastAPI's wording: the parsed document, validated as a parameter would be
        return JobCreate.model_validate(json.loads(raw), from_attributes=True), []
    except ValidationError as exc:
        return None, _located(exc, ("body",))


def wait_seconds(request: Request) -> float | None:
    """The ``wait`` query parameter of a submit request (absent: None)."""
    raw = request.query_params.get("wait")
    if raw is None:
        return None
    try:
        return _WAIT.validate_python(raw, strict=False)
    except ValidationError as exc:
        raise RequestValidationError(_located(exc, ("query", "wait"))) from None


async def submission(request: Request) -> tuple[JobCreate, str | None]:
    """The ``JobCreate`` and the ``Idempotency-Key`` header of a submit request."""
    errors: list[dict[str, Any]] = []
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None:
        try:
            _KEY.validate_python(key)
        except ValidationError as exc:
            errors += _located(exc, ("header", IDEMPOTENCY_HEADER))
    item, body_errors = _body(await request.body())
    errors += body_errors
    if errors or item is None:
        raise RequestValidationError(errors)
    return item, key
