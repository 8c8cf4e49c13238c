"""What a job type promises its producers: the JSON Schema of its result.

The payload's schema is the payload model's (:meth:`JobType.json_schema`); the result's is
read from the handler's return annotation (``-> dict[str, float]``, a ``TypedDict``...), in
pydantic's serialization mode. A handler without a return annotation, or with one pydantic
cannot describe, promises any JSON value (``{}``).
"""

from __future__ import annotations

import logging
from typing import Any, get_type_hints

from pydantic import TypeAdapter

from app.jobs.registry import JobType

log = logging.getLogger(__name__)

_MISSING = object()


def result_annotation(job_type: JobType) -> Any:
    """The handler's return annotation, or ``_MISSING`` when it has none or it cannot be
    resolved."""
    try:
        return get_type_hints(job_type.handler).get("return", _MISSING)
    except Exception as exc:  # e.g. a forward reference the module cannot resolve
        log.warning("cannot read the return annotation of %r: %s", job_type.name, exc)
        return _MISSING


def result_schema(job_type: JobType) -> dict[str, Any]:
    """The JSON Schema of the handler's result, as stored in the job's ``result``; never
    raises (the document must always be served)."""
    annotation = result_annotation(job_type)
    if annotation is _MISSING:
        return {}
    try:
        schema = TypeAdapter(annotation).json_schema(mode="serialization")
    except Exception as exc:  # arbitrary types, or types pydantic cannot describe
        log.warning("cannot describe the result of %r: %s", job_type.name, exc)
        return {}
    return schema
