"""OpenTelemetry tracing: the ``otel`` extra, off unless the standard ``OTEL_*`` variables
ask for it (``OTEL_TRACES_EXPORTER``, or an OTLP endpoint).

Off (the default), nothing of OpenTelemetry is imported and every hook here is a call that
returns a shared do-nothing object. On, each process has one SDK tracer provider
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the
``OTEL_BSP_*`` batch settings are the SDK's own) and:

- the API instruments FastAPI, asyncpg (which the SQLAlchemy engine uses too), redis and
  httpx; a submission opens a ``submit <type>`` span (kind PRODUCER) under the request's
  span, and its W3C ``traceparent`` is stored with the job (``jobs.traceparent``, written by
  the same INSERT) and carried in the job's first stream entry (field ``tp``);
- a worker instruments httpx (what handlers call out to) and runs each attempt in a
  ``process <type>`` span (kind CONSUMER) whose parent is the traceparent of the job's row,
  which its claim returns: every attempt of a job, after a retry, a promotion or a re-send,
  lands in the trace of its submission. Spans that handlers open nest under it.

See ADR 0022.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
# OTLP over HTTP unless OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says grpc: the specification's
# default (the Python SDK's own auto-configuration picks gRPC).
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
# Health, readiness and scrapes would be most of the spans and say nothing.
EXCLUDED_URLS = "healthz,readyz,metrics"


class _Tracing:
    provider: TracerProvider | None = None
    tracer: Tracer | None = None
    instrumented: set[str] = set()  # one per process


_STATE = _Tracing()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces: ``OTEL_TRACES_EXPORTER`` other than
    ``none``, or an OTLP endpoint; never with ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = environ.get("OTEL_TRACES_EXPORTER")
    if names is not None and names.strip():
        return names.strip().lower() != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def enabled() -> bool:
    return _STATE.tracer is not None


def setup(service: str) -> bool:
    """Start tracing from the environment, once per process; ``service`` is the default
    ``service.name``. False when it is off, or the extra is missing (logged)."""
    if _STATE.provider is not None:
        return True
    if not wanted():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "the OTEL_* variables ask for traces but OpenTelemetry is not installed"
            " (pip install 'conveyor[otel]'): tracing is off"
        )
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info("tracing on: %s", os.environ.get("OTEL_TRACES_EXPORTER") or "otlp")
    return True


def _exporters() -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (default ``otlp``), by their entry points
    (``console``, ``otlp``, ``otlp_proto_http``, ``otlp_proto_grpc``, or any installed)."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    found: list[SpanExporter] = []
    for raw in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        name = raw.strip()
        if name in ("", "none"):
            continue
        if name == "otlp":
            name = _OTLP_BY_PROTOCOL.get(protocol, "otlp_proto_http")
        points = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not points:
            log.warning("no trace exporter %r is installed; skipped", name)
            continue
        try:
            found.append(next(iter(points)).load()())
        except Exception as exc:  # a bad OTEL_* value must not keep the service from starting
            log.warning("trace exporter %r could not start: %s; skipped", name, exc)
    return found


def install(provider: TracerProvider) -> None:
    """Use ``provider`` (tests: one with an in-memory exporter); also the global provider, so
    that handlers' own spans join the traces."""
    from opentelemetry import trace

    _STATE.provider = provider
    _STATE.tracer = provider.get_tracer("conveyor")
    if not isinstance(trace.get_tracer_provider(), type(provider)):
        trace.set_tracer_provider(provider)


def shutdown() -> None:
    """Export what is buffered (at a process's end)."""
    if _STATE.provider is not None:
        _STATE.provider.force_flush()


def reset() -> None:
    """Stop tracing in this process and undo the library instrumentations (tests)."""
    for name in sorted(_STATE.instrumented):
        _instrumentor(name).uninstrument()
    _STATE.instrumented.clear()
    _STATE.provider = None
    _STATE.tracer = None


# -- instrumentation ------------------------------------------------------------------------


def instrument_api(app: FastAPI) -> None:
    if _STATE.provider is None:
        return
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:
        log.warning("opentelemetry-instrumentation-fastapi is not installed: no request spans")
    else:
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=_STATE.provider,
            excluded_urls=EXCLUDED_URLS,
            exclude_spans=["receive", "send"],  # one span per ASGI message: half the spans
        )
    instrument_libraries("asyncpg", "redis", "httpx")


def instrument_libraries(*names: str) -> None:
    """The contrib instrumentations of these libraries that are installed (once each)."""
    if _STATE.provider is None:
        return
    for name in names:
        if name in _STATE.instrumented:
            continue
        instrumentor = _instrumentor(name)
        if instrumentor is None:
            log.info("opentelemetry-instrumentation-%s is not installed: skipped", name)
            continue
        instrumentor.instrument(tracer_provider=_STATE.provider)
        _STATE.instrumented.add(name)


def _instrumentor(name: str) -> Any:
    try:
        if name == "asyncpg":
            from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

            return AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        if name == "redis":
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            return RedisInstrumentor()
        if name == "httpx":
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            return HTTPXClientInstrumentor()
    except ImportError:
        return None
    raise ValueError(f"no instrumentation for {name!r}")


@contextmanager
def quiet() -> Iterator[None]:
    """Tasks started in this block trace nothing: the statements of background loops would
    each be a root span with nothing to say."""
    if _STATE.provider is None:
        yield
        return
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


# -- spans ----------------------------------------------------------------------------------


class _Off:
    """What the hooks give while tracing is off: nothing happens, nothing is allocated."""

    traceparent: str | None = None

    def __enter__(self) -> _Off:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def submitted(self, job_ids: list[UUID]) -> None:
        return None

    def outcome(self, name: str, error: str | None = None) -> None:
        return None


OFF = _Off()


class _On:
    """A span made current for a ``with`` block; ``traceparent`` is its W3C context."""

    def __init__(self, span: Span) -> None:
        from opentelemetry import trace

        self.span = span
        self._scope = trace.use_span(span, end_on_exit=True)

    @property
    def traceparent(self) -> str | None:
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, set_span_in_context(self.span))
        return carrier.get(TRACEPARENT)

    def __enter__(self) -> _On:
        self._scope.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._scope.__exit__(kind, exc, tb)

    def submitted(self, job_ids: list[UUID]) -> None:
        """The ids of the jobs the submission made or named."""
        if len(job_ids) == 1:
            self.span.set_attribute("conveyor.job.id", str(job_ids[0]))
        self.span.set_attribute("messaging.batch.message_count", len(job_ids))

    def outcome(self, name: str, error: str | None = None) -> None:
        """How the attempt ended: ``succeeded``, ``failed``, ``timeout``, ``deferred``..."""
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("conveyor.outcome", name)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))


def submitting(job_type: str | None, queue: str | None, count: int = 1) -> _Off | _On:
    """The span of one submission (``count`` > 1: a batch, whose jobs share it)."""
    tracer = _STATE.tracer
    if tracer is None:
        return OFF
    from opentelemetry.trace import SpanKind

    attributes: dict[str, Any] = {"messaging.system": "conveyor", "messaging.operation": "send"}
    if queue is not None:
        attributes["messaging.destination.name"] = queue
    if job_type is not None:
        attributes["conveyor.job.type"] = job_type
    name = f"submit {job_type}" if count == 1 else f"submit batch of {count}"
    return _On(tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes))


def attempt(
    job_id: UUID, job_type: str, queue: str, number: int, worker: str, traceparent: str | None
) -> _Off | _On:
    """The span of one attempt, child of the submission whose ``traceparent`` the job kept
    (a root span when it has none: submitted untraced, or made by a schedule)."""
    tracer = _STATE.tracer
    if tracer is None:
        return OFF
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = (
        TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent}) if traceparent else None
    )
    attributes: dict[str, Any] = {
        "messaging.system": "conveyor",
        "messaging.operation": "process",
        "messaging.destination.name": queue,
        "conveyor.job.id": str(job_id),
        "conveyor.job.type": job_type,
        "conveyor.attempt": number,
        "conveyor.worker": worker,
    }
    span = tracer.start_span(
        f"process {job_type}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    )
    return _On(span)
