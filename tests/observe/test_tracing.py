"""OpenTelemetry (ADR 0022): one trace from the POST to the handler, through Postgres and the
stream entry; off, nothing is traced or stored. The SDK's in-memory exporter collects the
spans of the API and a worker that run in this process."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")

import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.main import create_app
from app.observe import tracing
from app.settings import Settings
from app.streams.keys import Keys
from tests.conftest import CLIENT_HEADERS, Backends, make_settings, wait_for_status
from tests.support.db import fetch
from tests.support.processes import Spawner
from workers.context import WorkerConfig
from workers.runner import Worker

HANDLERS = "tests.support.handlers,tests.support.traced_handlers"


@pytest.fixture(scope="session")
def exporter() -> InMemorySpanExporter:
    """One provider for the session: the global one, which handlers' own spans use, can be
    set only once per process."""
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    tracing.reset()
    return memory


@pytest.fixture
def traced(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test (as ``tracing.setup`` turns it on from OTEL_* variables)."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    tracing.install(provider)
    exporter.clear()
    try:
        yield exporter
    finally:
        tracing.reset()
        exporter.clear()


@pytest.fixture
def traced_settings(backends: Backends) -> Settings:
    return make_settings(backends, handler_modules=HANDLERS)


@asynccontextmanager
async def api_and_worker(settings: Settings, queue: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    worker = Worker(settings, WorkerConfig([queue], concurrency=4, name=f"tracing-{queue}"))
    async with app.router.lifespan_context(app):
        running = asyncio.create_task(worker.run())
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
            ) as client:
                yield client
        finally:
            worker.stop()
            await asyncio.wait_for(running, 60)


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _ids(traceparent: str | None) -> str:
    """version-trace id-span id of a W3C traceparent (the flags vary: sampled, random id)."""
    assert traceparent is not None
    return traceparent.rsplit("-", 1)[0]


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def _row(settings: Settings, job_id: str) -> Any:
    [row] = await fetch(
        settings.database_url, f"SELECT traceparent FROM jobs WHERE id = '{job_id}'"
    )
    return row


async def test_one_trace_from_the_post_to_the_handler(
    traced: InMemorySpanExporter, traced_settings: Settings, queue: str
) -> None:
    async with api_and_worker(traced_settings, queue) as client:
        answer = await client.post("/v1/jobs", json={"type": "test.traced", "queue": queue})
        assert answer.status_code == 202, answer.text
        job = await wait_for_status(client, answer.json()["id"], {"succeeded"}, timeout=60)
    spans = list(traced.get_finished_spans())

    [server] = [s for s in spans if s.kind == SpanKind.SERVER and s.name == "POST /v1/jobs"]
    trace_id = server.context.trace_id
    [submit] = _by_name(spans, "submit test.traced")
    [attempt] = _by_name(spans, "process test.traced")
    [work] = _by_name(spans, "handler work")
    assert submit.kind == SpanKind.PRODUCER and attempt.kind == SpanKind.CONSUMER
    for span in (submit, attempt, work):
        assert span.context.trace_id == trace_id, span.name
    # the chain: request → submit → attempt (in the worker) → the handler's own span
    assert _parent_id(attempt) == submit.context.span_id
    assert _parent_id(work) == attempt.context.span_id
    assert attempt.parent is not None and attempt.parent.is_remote  # from the stored context
    chain = {s.context.span_id: s for s in spans}
    up = _parent_id(submit)
    while up is not None and up != server.context.span_id:
        up = _parent_id(chain[up])
    assert up == server.context.span_id, "the submit span is not under the request's span"
    assert job["result"] == {"trace_id": _hex(trace_id, 32)}

    assert submit.attributes is not None and attempt.attributes is not None
    assert submit.attributes["conveyor.job.id"] == job["id"]
    assert submit.attributes["messaging.destination.name"] == queue
    assert attempt.attributes["conveyor.job.id"] == job["id"]
    assert attempt.attributes["conveyor.attempt"] == 1
    assert attempt.attributes["conveyor.outcome"] == "succeeded"

    # the library instrumentations: the group commit's INSERT and the XADD are in the trace
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    systems = {(s.attributes or {}).get("db.system") for s in in_trace}
    systems |= {(s.attributes or {}).get("db.system.name") for s in in_trace}
    assert {"postgresql", "redis"} <= systems, sorted(s.name for s in in_trace)

    row = await _row(traced_settings, job["id"])
    assert _ids(row[0]) == f"00-{_hex(trace_id, 32)}-{_hex(submit.context.span_id, 16)}"


async def test_each_attempt_of_a_retried_job_joins_the_submission_trace(
    traced: InMemorySpanExporter, traced_settings: Settings, queue: str
) -> None:
    """The second attempt comes from a promotion (a new stream entry without the context):
    its parent is the context stored in the job's row."""
    async with api_and_worker(traced_settings, queue) as client:
        body = {"type": "test.traced", "queue": queue, "payload": {"fail_times": 1}}
        answer = await client.post("/v1/jobs", json=body)
        assert answer.status_code == 202, answer.text
        await wait_for_status(client, answer.json()["id"], {"succeeded"}, timeout=60)
    spans = list(traced.get_finished_spans())
    [submit] = _by_name(spans, "submit test.traced")
    attempts = sorted(
        _by_name(spans, "process test.traced"),
        key=lambda s: (s.attributes or {})["conveyor.attempt"],  # type: ignore[arg-type, return-value]
    )
    assert [(s.attributes or {})["conveyor.attempt"] for s in attempts] == [1, 2]
    for span in attempts:
        assert span.context.trace_id == submit.context.trace_id
        assert _parent_id(span) == submit.context.span_id
    first, second = attempts
    assert first.status.status_code == StatusCode.ERROR
    assert first.status.description == "attempt 1 fails"
    assert (first.attributes or {})["conveyor.outcome"] == "failed"
    assert (second.attributes or {})["conveyor.outcome"] == "succeeded"


async def test_the_stream_entry_carries_the_trace_context(
    traced: InMemorySpanExporter, traced_settings: Settings, queue: str
) -> None:
    """No worker: the entry the API added stays in the stream to be read."""
    app = create_app(traced_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as client:
            single = await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})
            batch = await client.post(
                "/v1/jobs/batch",
                json={"jobs": [{"type": "demo.echo", "queue": queue} for _ in range(3)]},
            )
        stream = app.state.conveyor.stream
        entries = await stream.redis.xrange(Keys(traced_settings.redis_prefix).stream(queue, 0, 1))
    assert single.status_code == 202 and batch.status_code == 202, batch.text
    ids = [single.json()["id"], *(j["id"] for j in batch.json()["jobs"])]
    tp = {fields["job"]: fields.get("tp") for _, fields in entries}
    assert set(tp) == set(ids)
    for job_id in ids:
        row = await _row(traced_settings, job_id)
        assert row[0] is not None and tp[job_id] == row[0]
    spans = list(traced.get_finished_spans())
    [group] = _by_name(spans, "submit batch of 3")
    batch_ids = {_ids(tp[i]) for i in ids[1:]}
    assert batch_ids == {f"00-{_hex(group.context.trace_id, 32)}-{_hex(group.context.span_id, 16)}"}
    assert (group.attributes or {})["messaging.batch.message_count"] == 3


async def test_off_traces_nothing_and_stores_nothing(
    exporter: InMemorySpanExporter, settings: Settings, client: httpx.AsyncClient, queue: str
) -> None:
    """Tracing off (no OTEL_* variables): no span, no traceparent in the row or the entry,
    no instrumentation loaded."""
    exporter.clear()
    assert not tracing.enabled()
    answer = await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})
    assert answer.status_code == 202
    row = await _row(settings, answer.json()["id"])
    assert row[0] is None
    # FastAPI's own spans go to the global provider this module set; Conveyor's and the
    # instrumentations' do not exist
    ours = [
        s.name
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name.startswith(("conveyor", "opentelemetry.instrumentation"))
    ]
    assert ours == []
    assert tracing.submitting("demo.echo", queue) is tracing.OFF


def test_setup_follows_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.wanted(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}
        | {"OTEL_SDK_DISABLED": "true"}
    )
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.setup("conveyor-test") is False and not tracing.enabled()


def test_an_unknown_exporter_is_skipped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no_such_exporter,console")
    with caplog.at_level("WARNING", logger="app.observe.tracing"):
        exporters = tracing._exporters()
    assert [type(e).__name__ for e in exporters] == ["ConsoleSpanExporter"]
    assert "no trace exporter 'no_such_exporter'" in caplog.text
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert [type(e).__module__ for e in tracing._exporters()] == [
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    ]
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    assert [type(e).__module__ for e in tracing._exporters()] == [
        "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    ]


def test_without_the_extra_tracing_stays_off_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with caplog.at_level("WARNING", logger="app.observe.tracing"):
        assert tracing.setup("conveyor-test") is False
    assert not tracing.enabled()
    assert "pip install 'conveyor[otel]'" in caplog.text


def _spans_in(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (pretty JSON objects) among the log lines."""
    decoder = json.JSONDecoder()
    found = []
    at = text.find('{\n    "name"')
    while at != -1:
        span, end = decoder.raw_decode(text, at)
        found.append(span)
        at = text.find('{\n    "name"', end)
    return found


def test_real_processes_export_one_trace(spawn: Spawner, settings: Settings, queue: str) -> None:
    """``conveyor api`` and ``conveyor worker`` set tracing up from the standard variables
    alone (the console exporter here) and flush at exit."""
    api, url = spawn.api(OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="100")
    worker = spawn.worker([queue], OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="100")
    answer = httpx.post(f"{url}/v1/jobs", json={"type": "demo.echo", "queue": queue}, timeout=30)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.1)
    api.stop()  # uvicorn ends by re-raising SIGTERM; the lifespan flushed the spans before
    assert worker.stop() == 0
    api_spans, worker_spans = _spans_in(api.output()), _spans_in(worker.output())
    [submit] = [s for s in api_spans if s["name"] == "submit demo.echo"]
    [attempt] = [s for s in worker_spans if s["name"] == "process demo.echo"]
    assert submit["resource"]["attributes"]["service.name"] == "conveyor-api"
    assert attempt["resource"]["attributes"]["service.name"] == "conveyor-worker"
    assert attempt["context"]["trace_id"] == submit["context"]["trace_id"]
    assert attempt["parent_id"] == submit["context"]["span_id"]
    assert attempt["attributes"]["conveyor.job.id"] == job_id
    assert any(s["kind"] == "SpanKind.SERVER" and s["name"] == "POST /v1/jobs" for s in api_spans)
    # the background loops (counters, confirmations, waits) trace nothing: every span is of
    # the request's trace or of a request the API excludes (/healthz: the spawner's readiness)
    roots = [s["name"] for s in api_spans if s["parent_id"] is None]
    assert set(roots) <= {"POST /v1/jobs", "GET /v1/jobs/{job_id}"}, roots
