"""Pinned failures: each input here once got a wrong answer from the API.

Found by schemathesis (``test_fuzz.py``) or by probing the API as it was before the body limits
(the walking skeleton): the previous answer is in each case's comment. They stay pinned so the
answer never regresses.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import Backends, make_settings
from tests.security.conftest import Database, Keys, bearer


def _submission(payload_json: str) -> bytes:
    return f'{{"type": "demo.echo", "payload": {payload_json}}}'.encode()


# (id, body, what the skeleton answered)
STORED_WRONG_OR_5XX = [
    ("nul-in-value", _submission('{"a": "x\\u0000"}'), "503 unavailable (jsonb rejects NUL)"),
    ("nul-in-idempotency-key", b'{"type": "demo.echo", "idempotency_key": "a\\u0000b"}', "503"),
    ("lone-surrogate-value", _submission('{"a": "x\\ud800"}'), "503 (UTF-8 encode failed)"),
    ("lone-surrogate-key", _submission('{"\\ud800": 1}'), "202, key stored as U+FFFD garbage"),
    ("overflowing-number", _submission('{"a": 1e400}'), "202, stored as null"),
    ("nan", _submission('{"a": NaN}'), "202, stored as null"),
    ("duplicate-key", _submission('{"a": 1, "a": 2}'), "202, the last one silently won"),
    ("depth-5000", _submission("[" * 5000 + "]" * 5000), "400 from a RecursionError"),
    ("5000-digit-integer", _submission('{"a": ' + "9" * 5000 + "}"), "400 'error parsing'"),
]


@pytest.mark.parametrize(
    "body", [c[1] for c in STORED_WRONG_OR_5XX], ids=[c[0] for c in STORED_WRONG_OR_5XX]
)
async def test_unstorable_json_is_422_and_writes_nothing(
    client: httpx.AsyncClient, db: Database, body: bytes
) -> None:
    before = await db.snapshot()
    response = await client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    assert await db.snapshot() == before


async def test_schema_errors_do_not_echo_the_payload(client: httpx.AsyncClient) -> None:
    """pydantic's error details carry ``input``: the rejected payload value went back out."""
    secret = "s3cr3t-value-in-a-bad-payload"
    for job in (
        {"type": "demo.sleep", "payload": {"seconds": secret}},
        {"type": "demo.fail", "payload": {"fail_times": secret}},
        {"type": "demo.echo", "max_attempts": secret},
    ):
        response = await client.post("/v1/jobs", json=job)
        assert response.status_code == 422
        assert secret not in response.text
        assert all("input" not in d for d in response.json()["details"])


async def test_wrong_key_with_malformed_body_is_401(
    secure_client: httpx.AsyncClient, db: Database
) -> None:
    """The skeleton parsed the body before authenticating: 422 for a caller with no key."""
    before = await db.counts()
    response = await secure_client.post(
        "/v1/jobs",
        content=b'{"type": ',
        headers={"Content-Type": "application/json", **bearer("wrong")},
    )
    assert response.status_code == 401
    assert await db.counts() == before


async def test_text_plain_body_is_415(client: httpx.AsyncClient) -> None:
    """The skeleton answered 422 'model_attributes_type' for a JSON body sent as text/plain."""
    response = await client.post(
        "/v1/jobs", content=b'{"type": "demo.echo"}', headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"


def _document(settings: Settings) -> dict[str, Any]:
    document: dict[str, Any] = create_app(settings).openapi()
    return document


def test_openapi_declares_security_only_when_keys_are_configured(
    backends: Backends, keys: Keys
) -> None:
    """schemathesis ST401 'API accepts requests without authentication' on every /v1 operation
    with auth off: the document declared Bearer/X-API-Key security the server did not enforce.
    """
    open_doc = _document(make_settings(backends))
    assert "securitySchemes" not in open_doc["components"]
    assert all("security" not in op for ops in open_doc["paths"].values() for op in ops.values())
    secured = _document(make_settings(backends, api_keys=keys.spec))
    assert set(secured["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    for path, ops in secured["paths"].items():
        for op in ops.values():
            assert ("security" in op) == path.startswith("/v1/"), path


def test_openapi_lists_the_registered_job_types(settings: Settings) -> None:
    """Without the enum, schemathesis never produced a known type, so every positive submit was
    a 422 and payload storage went unfuzzed."""
    document = _document(settings)
    types = document["components"]["schemas"]["JobCreate"]["properties"]["type"]["enum"]
    assert {"demo.echo", "demo.sleep", "demo.fail"} <= set(types)
