"""Pinned failures: each input here once got a wrong answer from the API.

Found by schemathesis (``test_fuzz.py``) or by probing the API as it was before the body limits
(the walking skeleton): the previous answer is in each case's comment. They stay pinned so the
answer never regresses.
"""

from __future__ import annotations

import base64
import uuid
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
    a 422 and payload storage went unfuzzed. The types are now the variants of the ``type``
    discriminator, each with ``const``."""
    document = _document(settings)
    types = document["components"]["schemas"]["JobCreate"]["discriminator"]["mapping"]
    assert {"demo.echo", "demo.sleep", "demo.fail"} <= set(types)


# schemathesis ST101 (--hypothesis-seed=7967443801633909912823098079999453848, 200 examples):
# POST /v1/jobs/batch with "run_at": "0603-11-24T23:06:09-18:07" was a 503: PostgreSQL refuses
# UTC offsets beyond ±15:59, and a time whose UTC form leaves years 1..9999 cannot be stored or
# read back. The same inputs reached the created_after/created_before filters and the cursor.
OFFSET_BEYOND_POSTGRES = "2030-01-01T00:00:00-18:07"
BEFORE_YEAR_1_IN_UTC = "0001-01-01T00:00:00+01:00"
AFTER_YEAR_9999_IN_UTC = "9999-12-31T23:59:59-01:00"


async def test_run_at_with_any_offset_is_stored_in_utc(client: httpx.AsyncClient) -> None:
    for run_at, expected in [
        (OFFSET_BEYOND_POSTGRES, "2030-01-01T18:07:00Z"),
        ("2030-01-01T00:00:00+16:00", "2029-12-31T08:00:00Z"),
    ]:
        response = await client.post("/v1/jobs", json={"type": "demo.echo", "run_at": run_at})
        assert response.status_code == 202, response.text
        assert response.json()["run_at"] == expected
        assert response.json()["status"] == "scheduled"


@pytest.mark.parametrize("run_at", [BEFORE_YEAR_1_IN_UTC, AFTER_YEAR_9999_IN_UTC])
async def test_run_at_outside_the_storable_range_is_422(
    client: httpx.AsyncClient, db: Database, run_at: str
) -> None:
    before = await db.snapshot()
    for path, body in [
        ("/v1/jobs", {"type": "demo.echo", "run_at": run_at}),
        (
            "/v1/jobs/batch",
            {"jobs": [{"type": "demo.echo"}, {"type": "demo.echo", "run_at": run_at}]},
        ),
    ]:
        response = await client.post(path, json=body)
        assert response.status_code == 422, response.text
    assert await db.snapshot() == before


@pytest.mark.parametrize(
    "when", [OFFSET_BEYOND_POSTGRES, BEFORE_YEAR_1_IN_UTC, AFTER_YEAR_9999_IN_UTC]
)
async def test_listing_filters_and_cursors_with_extreme_times_are_never_5xx(
    client: httpx.AsyncClient, when: str
) -> None:
    cursor = base64.urlsafe_b64encode(f"{when}|{uuid.uuid4()}".encode()).decode().rstrip("=")
    for path, params in [
        ("/v1/jobs", {"created_after": when}),
        ("/v1/jobs", {"created_before": when}),
        ("/v1/jobs", {"cursor": cursor}),
        ("/v1/dlq", {"cursor": cursor}),
    ]:
        response = await client.get(path, params=params)
        expected = {200} if when == OFFSET_BEYOND_POSTGRES else {422}
        assert response.status_code in expected, (path, params, response.text)


async def test_replay_id_list_over_its_maximum_is_422_not_413(client: httpx.AsyncClient) -> None:
    """schemathesis ST201 (negative_data_rejection): 10,001 ids, one past the declared
    maxItems, made a body over the size limit, so the schema violation was answered 413."""
    ids = [str(uuid.uuid4()) for _ in range(5001)]
    too_many = await client.post("/v1/dlq/replay", json={"ids": ids})
    assert too_many.status_code == 422, too_many.text
    most = await client.post("/v1/dlq/replay", json={"ids": ids[:5000]})
    assert most.status_code == 202 and most.json() == {"replayed": 0}


# schemathesis ST201 (negative_data_rejection, 200 random examples): a number where an ISO
# date-time is documented was read as a Unix timestamp (GET /v1/jobs?created_after=1.17e-38
# answered 200), and a repeated scalar query parameter silently kept its last value.
@pytest.mark.parametrize("value", ["1.175494351e-38", "-7.9e-46", "1700000000", "tomorrow"])
async def test_datetime_parameters_take_only_iso_8601(
    client: httpx.AsyncClient, db: Database, value: str
) -> None:
    listing = await client.get("/v1/jobs", params={"created_after": value})
    assert listing.status_code == 422, listing.text
    before = await db.snapshot()
    number: Any = float(value) if value[0].isdigit() or value[0] == "-" else value
    submit = await client.post("/v1/jobs", json={"type": "demo.echo", "run_at": number})
    assert submit.status_code == 422, submit.text
    assert await db.snapshot() == before


async def test_repeated_query_parameter_is_422(client: httpx.AsyncClient) -> None:
    for path, query in [
        ("/v1/dlq", "queue=a&queue=b"),
        ("/v1/jobs", "status=queued&status=running"),
        ("/v1/jobs", "limit=1&limit=2"),
    ]:
        response = await client.get(f"{path}?{query}")
        assert response.status_code == 422, response.text
        assert response.json()["details"][0]["type"] == "repeated"
    assert (await client.get("/v1/jobs?status=queued&limit=2")).status_code == 200


# schemathesis ST201 (--hypothesis-seed=98416133424806432698783230619379215341, 200 examples):
# {"timeout_seconds": true} in a batch item was accepted as a 1-second timeout.
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_seconds", True),
        ("delay_seconds", True),
        ("max_attempts", True),
        ("priority", False),
        ("max_attempts", "5"),
        ("priority", 1.5),
        ("timeout_seconds", "10"),
    ],
)
async def test_numbers_are_not_coerced_from_booleans_or_strings(
    client: httpx.AsyncClient, db: Database, field: str, value: Any
) -> None:
    before = await db.snapshot()
    item = {"type": "demo.echo", field: value}
    assert (await client.post("/v1/jobs", json=item)).status_code == 422
    batch = await client.post("/v1/jobs/batch", json={"jobs": [{"type": "demo.echo"}, item]})
    assert batch.status_code == 422
    assert batch.json()["details"][0]["index"] == 1
    assert await db.snapshot() == before


def test_query_parameters_are_not_declared_nullable(settings: Settings) -> None:
    """schemathesis ST201 (--hypothesis-seed=320363598616565556540223472140820831993, 300
    examples): GET /v1/dlq?type=null was its "null" mutation of a parameter documented as
    ``anyOf: [string, null]``, but a query string cannot carry JSON null ("null" is a valid
    type name), so the document now declares the parameter as a plain optional string."""
    document = _document(settings)
    for path, ops in document["paths"].items():
        for op in ops.values():
            for parameter in op.get("parameters", []):
                assert "anyOf" not in parameter["schema"], (path, parameter["name"])
