"""The OpenAPI 3.1 document: FastAPI's, plus what only the registry knows.

For every registered job type (``Settings.handler_module_list``, loaded at app start):

- ``Payload.<type>``: the payload model's JSON Schema;
- ``JobCreate.<type>``: a ``JobCreate`` whose ``type`` is that one name (``const``) and whose
  ``payload`` is ``Payload.<type>`` (required when ``{}`` is not a valid payload);
- ``JobResult.<type>``: the schema of the handler's result, from its return annotation
  (:mod:`app.jobs.contracts`), named from ``JobCreate.<type>`` (``x-conveyor-result``) and
  from ``Job.result``'s description.

``JobCreate`` itself becomes ``oneOf`` the variants with a ``discriminator`` on ``type``, so
that generated clients get one typed class per job type. Only the document changes: the
request is still validated by the :class:`JobCreate` model (:mod:`app.api.bodies`) and then
by the type's payload model, with the same errors as before. With no registered type the
generic ``JobCreate`` stays. Type names may hold ``:``, which component names may not; it
becomes ``_`` in the names (``discriminator.mapping`` keeps the real name).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError

from app.jobs.contracts import result_schema
from app.jobs.registry import JobType, Registry
from app.jobs.schemas import JobCreate

REF = "#/components/schemas/"

SECURITY_SCHEMES: dict[str, Any] = {
    "HTTPBearer": {
        "type": "http",
        "description": "`Authorization: Bearer <secret>`",
        "scheme": "bearer",
    },
    "APIKeyHeader": {
        "type": "apiKey",
        "description": "`X-API-Key: <secret>`",
        "in": "header",
        "name": "X-API-Key",
    },
}

_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]")


def component(kind: str, type_name: str) -> str:
    """The component name of a job type's schema: ``Payload.demo.echo``, ``JobResult.a_b``
    for type ``a:b`` (OpenAPI allows only ``[A-Za-z0-9._-]`` in component names)."""
    return f"{kind}.{_NOT_IN_NAMES.sub('_', type_name)}"


def build(app: FastAPI, registry: Registry, auth: bool) -> dict[str, Any]:
    """The document of ``app`` (cached on it).

    The security schemes (enforced by the gate, not by route dependencies) are declared on
    every ``/v1`` operation when API keys are configured; without keys the document declares
    none: it describes this server.
    """
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _add_model(components, JobCreate)  # POST /v1/jobs declares its body by reference
    job_types = registry.all()
    for job_type in job_types:
        _add_schema(components, component("Payload", job_type.name), _payload(job_type))
        _add_schema(components, component("JobResult", job_type.name), _result(job_type))
    if job_types:
        _discriminate(components, job_types)
    _point_to_results(components)
    if auth:
        schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    _short_operation_ids(schema.get("paths", {}))
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if auth and path.startswith("/v1/"):
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
            tidy_operation(operation)
    app.openapi_schema = schema
    return schema


def _short_operation_ids(paths: dict[str, Any]) -> None:
    """FastAPI's operation ids (``submit_job_v1_jobs_post``: name, path, method) become the
    handlers' names (``submit_job``), which generated clients name their functions after; a
    name that two operations share keeps FastAPI's id."""
    short: dict[tuple[str, str], str] = {}
    for path, operations in paths.items():
        for method, operation in operations.items():
            suffix = re.sub(r"\W", "_", path) + "_" + method
            operation_id = operation.get("operationId", "")
            if operation_id.endswith(suffix) and len(operation_id) > len(suffix):
                short[path, method] = operation_id[: -len(suffix)]
    names = Counter(short.values())
    for (path, method), name in short.items():
        if names[name] == 1:
            paths[path][method]["operationId"] = name


def _payload(job_type: JobType) -> dict[str, Any]:
    payload = job_type.json_schema()
    payload["title"] = component("Payload", job_type.name)  # types may share a model
    payload["description"] = job_type.description or f"Payload of {job_type.name}"
    return payload


def _result(job_type: JobType) -> dict[str, Any]:
    result = result_schema(job_type)
    result["title"] = component("JobResult", job_type.name)
    result["description"] = (
        f"The `result` of a succeeded {job_type.name} job (from its handler's return annotation)."
    )
    return result


def _add_schema(components: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """``schema`` as component ``name``; its own ``$defs`` become components too."""
    for sub_name, sub in schema.pop("$defs", {}).items():
        components.setdefault(sub_name, _rewrite_refs(sub))
    components[name] = _rewrite_refs(schema)


def _payload_required(job_type: JobType) -> bool:
    """An omitted payload is ``{}``: required in the document when ``{}`` is not valid."""
    try:
        job_type.model.model_validate({})
    except ValidationError:
        return True
    return False


def _discriminate(components: dict[str, Any], job_types: list[JobType]) -> None:
    """``JobCreate`` as ``oneOf`` one variant per job type, discriminated by ``type``."""
    generic = components["JobCreate"]
    mapping: dict[str, str] = {}
    for job_type in job_types:
        name = component("JobCreate", job_type.name)
        properties = dict(generic["properties"])
        properties["type"] = {"type": "string", "const": job_type.name, "title": "Type"}
        properties["payload"] = {"$ref": REF + component("Payload", job_type.name)}
        required = ["type", "payload"] if _payload_required(job_type) else ["type"]
        variant = {k: v for k, v in generic.items() if k != "examples"}
        variant.update(
            title=name,
            description=f"Submit a {job_type.name} job. {job_type.description}".strip(),
            properties=properties,
            required=required,
        )
        variant["x-conveyor-result"] = REF + component("JobResult", job_type.name)
        components[name] = variant
        mapping[job_type.name] = REF + name
    components["JobCreate"] = {
        "title": "JobCreate",
        "description": (
            f"{generic.get('description', '')} One variant per registered job type"
            " (`JobCreate.<type>`), chosen by `type`."
        ).strip(),
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping},
        **({"examples": generic["examples"]} if "examples" in generic else {}),
    }


def _point_to_results(components: dict[str, Any]) -> None:
    result = components.get("Job", {}).get("properties", {}).get("result")
    if result is not None:
        said = result.get("description") or "What the handler returned (null until it succeeds)."
        result["description"] = (
            f"{said} Its schema is `components/schemas/JobResult.<type>` of the job's type."
        )


def _add_model(components: dict[str, Any], model: type[BaseModel]) -> None:
    """The component schemas FastAPI makes for ``model`` as a body, as a body parameter would
    have added them."""
    probe = FastAPI()

    async def endpoint(body: Any) -> None: ...

    endpoint.__annotations__ = {"body": model, "return": None}
    probe.post("/", responses={422: {"description": "none"}})(endpoint)
    for name, sub in probe.openapi()["components"]["schemas"].items():
        components.setdefault(name, sub)


def tidy_operation(operation: dict[str, Any]) -> None:
    """A query or header parameter cannot be JSON ``null`` (absent is the only way to omit
    it), so ``anyOf: [X, null]`` becomes plain X."""
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
        if len(options) == 1 and len(schema["anyOf"]) == 2:
            del schema["anyOf"]
            schema.update(options[0])


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace("#/$defs/", REF) if k == "$ref" else _rewrite_refs(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node
