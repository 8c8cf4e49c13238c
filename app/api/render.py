"""JSON bodies of the submit path, built directly with orjson.

A job made now is answered from the values that were inserted (the payload's JSON text is
embedded as it was stored, not parsed and serialised again); a job that an idempotency key
named goes through the ``Job`` model, so both answers have exactly the shape of
``GET /v1/jobs/{id}``, with its admin-only fields (tracebacks, worker names) shown only to
the callers whose ``view`` allows them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi.encoders import jsonable_encoder
from starlette.responses import JSONResponse, Response

from app.jobs.insertion import Submitted
from app.jobs.newjob import dump_json
from app.jobs.schemas import Job, JobEventOut
from app.jobs.waiting import Waited

_JSON_COLUMNS = ("payload", "result", "errors", "progress")


def job_document(answer: Submitted, view: Mapping[str, bool]) -> dict[str, Any]:
    """The ``Job`` of one answer, ready for :func:`orjson.dumps`; ``view`` is the caller's
    :attr:`Principal.view` (a new job has nothing admin-only yet)."""
    new = answer.new
    if new is None:
        assert answer.row is not None
        return _stored(answer.row, view)
    return {
        "id": new.id,
        "type": new.type,
        "queue": new.queue,
        "status": new.status.value,
        "priority": new.priority,
        "payload": orjson.Fragment(new.payload_json),
        "result": None,
        "attempts": 0,
        "max_attempts": new.max_attempts,
        "errors": [],
        "idempotency_key": new.idempotency_key,
        "timeout_seconds": new.timeout_seconds,
        "created_at": answer.created_at,
        "run_at": answer.run_at,
        "started_at": None,
        "finished_at": None,
        "next_attempt_at": None,
        "schedule": None,
        "scheduled_for": None,
        "cancel_requested_at": None,
        "unique_key": new.unique_key,
        "progress": None,
        "callback_url": new.callback_url,
        "callback": None
        if new.callback_url is None
        else {"status": "waiting", "attempts": 0, "last_error": None},
        "result_expires_at": None,
    }


def _stored(row: Mapping[str, Any], view: Mapping[str, bool]) -> dict[str, Any]:
    values = dict(row)
    for column in _JSON_COLUMNS:
        if isinstance(values.get(column), str):
            values[column] = json.loads(values[column])
    document: dict[str, Any] = Job.model_validate(values, context=view).model_dump(mode="json")
    for column in ("payload", "result"):  # may hold integers beyond orjson's 64 bits
        document[column] = orjson.Fragment(dump_json(document[column]))
    return document


def stored_job(row: Mapping[str, Any], view: Mapping[str, bool]) -> Response:
    """``GET /v1/jobs/{id}`` from :func:`app.jobs.reading.job`'s row."""
    return Response(dumps(_stored(row, view)), media_type="application/json")


def dumps(document: Any) -> bytes:
    """Like the API's other answers: compact, UTC written as ``Z``."""
    return orjson.dumps(document, option=orjson.OPT_UTC_Z)


def submitted(answer: Submitted, view: Mapping[str, bool]) -> Response:
    """202 with ``Location`` for a new job; 200 for the repeat of an idempotent request."""
    return Response(
        dumps(job_document(answer, view)),
        status_code=202 if answer.created else 200,
        headers={"Location": f"/v1/jobs/{answer.id}"},
        media_type="application/json",
    )


def submitted_batch(answers: Sequence[Submitted], view: Mapping[str, bool]) -> Response:
    body = dumps({"jobs": [job_document(a, view) for a in answers]})
    return Response(body, status_code=202, media_type="application/json")


def waited(waited: Waited, view: Mapping[str, bool]) -> Response:
    """``POST /v1/jobs?wait=``: 200 when the job finished in time (or the request was a
    repeat), else 202; the body is the job as it stands."""
    created = waited.answer.created
    return Response(
        dumps(_stored(waited.job, view)),
        status_code=202 if created and not waited.finished else 200,
        headers={"Location": f"/v1/jobs/{waited.answer.id}"},
        media_type="application/json",
    )


def events(items: Sequence[JobEventOut]) -> Response:
    """As FastAPI would answer ``list[JobEventOut]``."""
    return JSONResponse(jsonable_encoder(list(items)))
