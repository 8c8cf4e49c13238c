"""schemathesis against the app's own OpenAPI document, in-process, with the lifespan running.

Two variants: auth off, and API keys configured with the admin key supplied (so `ignored_auth`
probes every operation without a key and with a wrong one). Each operation is fuzzed with
valid (positive) and invalid (negative) data. Checks: no 5xx, responses match their declared
schema, content type and headers, every status is declared, auth is enforced, and invalid
input is rejected with a 4xx that says so. Bounded: a fixed number of examples per
operation and mode, no per-example deadline (the machine is shared). Any failure found here
gets pinned in ``test_regressions.py``.

(schemathesis's lazy ``from_fixture`` loader does not run under pytest 9, so each test loads
the document itself and drives the operation's Hypothesis strategy.)
"""

from __future__ import annotations

import json
import math
import os
from decimal import Decimal
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings
from tests.security.conftest import Keys
from tests.support.processes import Spawner

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    ignored_auth,
    content_type_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# Examples per operation and mode; CONVEYOR_FUZZ_EXAMPLES raises it for a deeper (random) run.
MAX_EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize="CONVEYOR_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=list(HealthCheck),
)
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE


def _cases() -> list[Any]:
    """(method, path, mode) for every operation; negative data only where there is input."""
    document = create_app(Settings(api_keys=None)).openapi()
    cases = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            has_input = bool(operation.get("parameters") or operation.get("requestBody"))
            for mode in (POSITIVE, NEGATIVE) if has_input else (POSITIVE,):
                label = f"{method.upper()} {path} {mode.value}"
                cases.append(pytest.param(method.upper(), path, mode, id=label))
    return cases


CASES = _cases()


# Invalid *and* oversized input may be refused for its size first: 413 is a rejection too.
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)


def _short_wait(case: Any) -> None:
    """A valid `?wait=` holds a request up to 60 s (beyond the client's 10 s timeout, and a
    job no worker runs waits all of it): fuzz it with waits of at most 0.5 s. Its range is
    checked by the negative cases and tests/api/test_wait.py."""
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool):
        case.query["wait"] = min(wait, 0.5)


def fuzz(app: Any, method: str, path: str, mode: GenerationMode, headers: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @FUZZ
    def run(case: Any) -> None:
        if mode is POSITIVE:
            _short_wait(case)
        case.call_and_validate(headers=headers or None, checks=CHECKS)

    run()


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz_without_auth(
    backends: Backends, method: str, path: str, mode: GenerationMode
) -> None:
    # as Conveyor's own clients do: bodiless POST/DELETE pass the cross-site check with it
    fuzz(create_app(make_settings(backends)), method, path, mode, CLIENT_HEADERS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz_with_admin_key(
    backends: Backends, keys: Keys, method: str, path: str, mode: GenerationMode
) -> None:
    app = create_app(make_settings(backends, api_keys=keys.spec))
    fuzz(app, method, path, mode, {"Authorization": f"Bearer {keys.admin}"})


# --- payload storage: arbitrary JSON through the API into jsonb and back ---

_text = st.text(st.characters(codec=None), max_size=12)  # includes NUL and lone surrogates
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | _text  # NaN, inf, -0.0
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_payloads = st.dictionaries(_text, _json, max_size=5)


def _bad_text(text: str) -> bool:
    return "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def storable(value: Any) -> bool:
    """Whether PostgreSQL jsonb (and strict JSON) can hold the value unchanged."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not _bad_text(value)
    if isinstance(value, list):
        return all(storable(v) for v in value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    return True


def numbers_as_decimals(value: Any) -> Any:
    """JSON-level equality: jsonb keeps numbers as exact decimals (1e308 comes back an int)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if isinstance(value, list):
        return [numbers_as_decimals(v) for v in value]
    return {k: numbers_as_decimals(v) for k, v in value.items()}


def test_any_json_payload_is_stored_exactly_or_rejected_with_422(
    spawn: Spawner, queue: str
) -> None:
    """Never a 5xx: storable payloads round-trip through jsonb; the rest get a 422."""
    _, url = spawn.api()
    with httpx.Client(base_url=url, timeout=30) as client:

        @given(payload=_payloads)
        @settings(FUZZ, max_examples=MAX_EXAMPLES * 6)
        def run(payload: dict[str, Any]) -> None:
            envelope = {"type": "demo.echo", "queue": queue, "payload": payload}
            response = client.post(
                "/v1/jobs",
                content=json.dumps(envelope, allow_nan=True).encode(),
                headers={"Content-Type": "application/json"},
            )
            if not storable(payload):
                assert response.status_code == 422, response.text
                assert response.json()["error"] == "invalid"
                return
            assert response.status_code == 202, response.text
            stored = client.get(f"/v1/jobs/{response.json()['id']}").json()["payload"]
            assert numbers_as_decimals(stored) == numbers_as_decimals(payload)

        run()
