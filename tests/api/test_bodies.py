"""POST /v1/jobs parses its body and header itself (app/api/bodies.py): every error, and the
OpenAPI description, must be what FastAPI gives for ``body: JobCreate`` and an
``Idempotency-Key`` header parameter."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Header, Query

from app.api import errors
from app.api.bodies import WAIT_DESCRIPTION
from app.api.openapi import tidy_operation
from app.jobs.schemas import JobCreate
from app.main import create_app
from app.settings import Settings

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]
Wait = Annotated[
    float | None,
    Query(
        gt=0,
        le=60,
        allow_inf_nan=False,
        description=WAIT_DESCRIPTION + " A job finished in time is answered with 200.",
    ),
]


def _reference() -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.post("/v1/jobs", status_code=202)
    async def submit(
        body: JobCreate, idempotency_key: IdempotencyKey = None, wait: Wait = None
    ) -> None:
        return None

    return app


BODIES = [
    b"",
    b"[]",
    b'"text"',
    b"null",
    b"7",
    b"{}",
    b'{"type": 5}',
    b'{"type": "demo.echo", "priority": "3"}',
    b'{"type": "demo.echo", "priority": true}',
    b'{"type": "demo.echo", "max_attempts": 0, "queue": "bad queue"}',
    b'{"type": "demo.echo", "extra": 1}',
    b'{"type": "demo.echo", "payload": []}',
    b'{"type": "demo.echo", "run_at": "2030-01-01T00:00:00"}',
    b'{"type": "demo.echo", "run_at": 1700000000}',
    b'{"type": "demo.echo", "run_at": "2030-01-01T00:00:00Z", "delay_seconds": 1}',
    b'{"type": "demo.echo", "timeout_seconds": 0, "delay_seconds": -1}',
]
KEYS = [None, "", "k" * 256]
WAITS = ["0", "-1", "61", "abc", "nan", "inf", ""]


@pytest.mark.parametrize("key", KEYS, ids=["no-key", "empty-key", "long-key"])
async def test_errors_are_those_of_fastapi_parameters(
    client: httpx.AsyncClient, key: str | None
) -> None:
    reference = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_reference()), base_url="http://conveyor"
    )
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with reference:
        for body in BODIES:
            ours = await client.post("/v1/jobs", content=body, headers=headers)
            theirs = await reference.post("/v1/jobs", content=body, headers=headers)
            assert ours.status_code == theirs.status_code == 422, (body, ours.text)
            assert ours.json() == theirs.json(), body


async def test_wait_errors_are_those_of_a_fastapi_parameter(client: httpx.AsyncClient) -> None:
    reference = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_reference()), base_url="http://conveyor"
    )
    body = {"type": "demo.echo"}
    async with reference:
        for wait in WAITS:
            ours = await client.post("/v1/jobs", params={"wait": wait}, json=body)
            theirs = await reference.post("/v1/jobs", params={"wait": wait}, json=body)
            assert ours.status_code == theirs.status_code == 422, (wait, ours.text)
            assert ours.json() == theirs.json(), wait


def test_openapi_describes_the_body_and_header_as_parameters_would(settings: Settings) -> None:
    """The body is declared as a ``body: JobCreate`` parameter would declare it; each job
    type's variant of ``JobCreate`` (app/api/openapi.py) is FastAPI's ``JobCreate`` with
    ``type`` fixed and ``payload`` typed."""
    ours = create_app(settings).openapi()
    theirs = _reference().openapi()
    operation: dict[str, Any] = theirs["paths"]["/v1/jobs"]["post"]
    tidy_operation(operation)
    mine = ours["paths"]["/v1/jobs"]["post"]
    assert mine["requestBody"] == operation["requestBody"]
    assert mine["parameters"] == operation["parameters"]
    reference = theirs["components"]["schemas"]["JobCreate"]
    schemas = ours["components"]["schemas"]
    variants = [schemas[o["$ref"].split("/")[-1]] for o in schemas["JobCreate"]["oneOf"]]
    assert len(variants) >= 3

    def common(properties: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in properties.items() if k not in ("type", "payload")}

    for variant in variants:
        assert variant["properties"].keys() == reference["properties"].keys()
        assert common(variant["properties"]) == common(reference["properties"])
        assert variant["additionalProperties"] is reference["additionalProperties"] is False
        assert variant["type"] == reference["type"] == "object"
