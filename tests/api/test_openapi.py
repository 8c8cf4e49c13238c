"""Typed clients: the OpenAPI document is valid 3.1, describes ``JobCreate`` as a union
discriminated by ``type`` and each type's result; a Python client generated from it (by
openapi-python-client, here, into a temporary directory) submits a job and waits for it
against a real API and worker."""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from pydantic import BaseModel

from app.api.openapi import component
from app.jobs.contracts import result_schema
from app.jobs.registry import JobContext, JobType
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_until
from tests.support.processes import Spawner

TYPED = "tests.support.handlers,tests.support.typed_handlers"
REF = "#/components/schemas/"


@pytest.fixture
def typed_settings(backends: Backends) -> Settings:
    return make_settings(backends, handler_modules=TYPED)


def _document(settings: Settings) -> dict[str, Any]:
    document: dict[str, Any] = create_app(settings).openapi()
    return document


@pytest.mark.parametrize("keys", [None, "producer:ops:s3cr3t-producer-key-0123456789"])
def test_the_document_validates_as_openapi_3_1(backends: Backends, keys: str | None) -> None:
    document = _document(make_settings(backends, handler_modules=TYPED, api_keys=keys))
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema


def test_the_validator_rejects_a_broken_document(typed_settings: Settings) -> None:
    """The check above can fail: a discriminator without its property name is reported."""
    document = _document(typed_settings)
    del document["components"]["schemas"]["JobCreate"]["discriminator"]["propertyName"]
    with pytest.raises(OpenAPIValidationError):
        validate(document)


def test_jobcreate_is_a_union_discriminated_by_type(typed_settings: Settings) -> None:
    schemas = _document(typed_settings)["components"]["schemas"]
    union = schemas["JobCreate"]
    mapping = union["discriminator"]["mapping"]
    assert union["discriminator"]["propertyName"] == "type"
    assert {"demo.echo", "demo.sleep", "test.resize", "test.nap"} <= set(mapping)
    assert [o["$ref"] for o in union["oneOf"]] == list(mapping.values())
    for name, ref in mapping.items():
        variant = schemas[ref.removeprefix(REF)]
        assert variant["properties"]["type"]["const"] == name
        payload = variant["properties"]["payload"]["$ref"].removeprefix(REF)
        assert schemas[payload]["title"] == payload  # unique class names, even for a shared model
        assert variant["x-conveyor-result"].removeprefix(REF) in schemas
    resize = schemas["JobCreate.test.resize"]
    assert resize["required"] == ["type", "payload"]  # {} is not a valid test.resize payload
    assert schemas["JobCreate.demo.echo"]["required"] == ["type"]
    assert schemas[resize["properties"]["payload"]["$ref"].removeprefix(REF)]["required"] == [
        "width",
        "height",
    ]
    # the other fields are JobCreate's own, with their constraints and descriptions
    assert resize["additionalProperties"] is False
    assert "> 0 is high" in resize["properties"]["priority"]["description"]
    assert resize["properties"]["max_attempts"]["maximum"] == 100
    assert schemas["JobBatchCreate"]["properties"]["jobs"]["items"] == {"$ref": REF + "JobCreate"}


def test_each_type_publishes_its_result_schema(typed_settings: Settings) -> None:
    schemas = _document(typed_settings)["components"]["schemas"]
    resize = schemas["JobResult.test.resize"]
    assert resize["type"] == "object"
    assert set(resize["required"]) == {"width", "height", "format"}
    assert resize["properties"]["format"]["enum"] == ["png", "jpeg"]
    assert schemas["JobResult.demo.sleep"]["additionalProperties"] == {"type": "number"}
    assert schemas["JobResult.test.crash"]["type"] == "null"  # -> None
    assert "type" not in schemas["JobResult.test.weird_result"]  # -> object: any JSON
    assert "JobResult.<type>" in schemas["Job"]["properties"]["result"]["description"]


class _Payload(BaseModel):
    n: int


async def _unannotated(payload: _Payload, ctx: JobContext):  # type: ignore[no-untyped-def]
    return {}


async def _unresolvable(payload: _Payload, ctx: JobContext) -> NoSuchType:  # type: ignore[name-defined]  # noqa: F821
    return {}


class _Opaque:
    pass


async def _opaque(payload: _Payload, ctx: JobContext) -> _Opaque:
    return _Opaque()


@pytest.mark.parametrize("handler", [_unannotated, _unresolvable, _opaque])
def test_a_result_that_cannot_be_described_is_any_json(handler: Any) -> None:
    """No annotation, one that does not resolve, or one pydantic cannot describe: ``{}``, and
    the document is still served."""
    job = JobType("x:odd", _Payload, handler, None, "")
    assert result_schema(job) == {}
    assert component("JobResult", job.name) == "JobResult.x_odd"


async def test_job_types_list_the_result_schema(typed_settings: Settings) -> None:
    app = create_app(typed_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://conveyor"
        ) as client,
    ):
        items = (await client.get("/v1/job-types")).json()["items"]
    resize = next(t for t in items if t["name"] == "test.resize")
    assert resize["result_schema"]["properties"]["format"]["enum"] == ["png", "jpeg"]


def _generate(document: dict[str, Any], into: Path) -> str:
    """Generate a client package from ``document``; its import name."""
    spec = into / "openapi.json"
    spec.write_text(json.dumps(document))
    config = into / "config.yaml"
    config.write_text("project_name_override: conveyor_generated\npost_hooks: []\n")
    out = into / "conveyor_generated"
    argv = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec)]
    argv += ["--output-path", str(out), "--meta", "none", "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # every job type's schemas became models (other parts, e.g. a streaming endpoint, may
    # be skipped by the generator with a warning; they are not what this test is about)
    for ours in ("JobCreate", "Payload.", "JobResult.", "schemas/Job\n"):
        assert ours not in done.stdout, done.stdout
    return "conveyor_generated"


async def test_a_generated_python_client_submits_and_waits(
    typed_settings: Settings, tmp_path: Path, queue: str
) -> None:
    """The client is generated while the API and then the worker start (from the same
    document: the one the started API serves is checked to be it)."""
    pytest.importorskip(
        "openapi_python_client",
        reason="openapi-python-client is not installed (pip install -e '.[dev]')",
    )
    document = json.loads(json.dumps(_document(typed_settings)))
    started = time.monotonic()
    generating = asyncio.create_task(asyncio.to_thread(_generate, document, tmp_path))
    spawn = Spawner(typed_settings, tmp_path)
    try:
        _, url = await asyncio.to_thread(spawn.api)
        spawn.worker([queue], concurrency=2)  # starts while the generator runs
        async with httpx.AsyncClient() as plain:
            served = (await plain.get(f"{url}/openapi.json")).json()
            # This process may have imported more job types (other test modules register
            # theirs): the served document is this one restricted to the served types.
            schemas = served["components"]["schemas"]
            assert schemas.keys() <= document["components"]["schemas"].keys()
            assert "JobCreate.test.resize" in schemas
            for name, schema in schemas.items():
                if name not in ("JobCreate", "JobTypeName"):
                    assert schema == document["components"]["schemas"][name], name
            assert served["paths"] == document["paths"]
        package = await generating
        generated_in = time.monotonic() - started
        sys.path.insert(0, str(tmp_path))
        try:
            await _round_trip(package, url, queue)
        finally:
            sys.path.remove(str(tmp_path))
            for name in [m for m in sys.modules if m.split(".")[0] == package]:
                del sys.modules[name]
        assert generated_in < 60, f"generation took {generated_in:.1f}s"
    finally:
        if not generating.done():
            await asyncio.wait([generating])
        spawn.stop_all()


async def _round_trip(package: str, url: str, queue: str) -> None:
    client_mod = importlib.import_module(f"{package}.client")
    models = importlib.import_module(f"{package}.models")
    submit_job = importlib.import_module(f"{package}.api.jobs.submit_job")
    get_job = importlib.import_module(f"{package}.api.jobs.get_job")

    client = client_mod.Client(
        base_url=url, headers=CLIENT_HEADERS, raise_on_unexpected_status=True
    )
    body = models.JobCreateTestResize(
        type_="test.resize",
        payload=models.PayloadTestResize(width=640, height=480),
        queue=queue,
        idempotency_key=f"typed-{uuid.uuid4().hex}",
    )
    submitted = await submit_job.asyncio(client=client, body=body)
    assert isinstance(submitted, models.Job), submitted
    assert submitted.type_ == "test.resize"
    assert submitted.status == models.JobStatus.QUEUED

    async def finished() -> Any:
        job = await get_job.asyncio(job_id=submitted.id, client=client)
        assert isinstance(job, models.Job), job
        return job if job.status in (models.JobStatus.SUCCEEDED, models.JobStatus.DEAD) else None

    job = await wait_until(finished, timeout=30, interval=0.1)
    assert job.status == models.JobStatus.SUCCEEDED, job
    result = models.JobResultTestResize.from_dict(job.result)
    assert (result.width, result.height, result.format_.value) == (320, 240, "png")

    unknown = await get_job.asyncio_detailed(job_id=uuid.uuid4(), client=client)
    assert unknown.status_code == 404
    assert isinstance(unknown.parsed, models.ErrorBody)  # errors are typed too
