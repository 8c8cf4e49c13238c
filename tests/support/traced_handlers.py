"""A job type whose handler opens a span of its own (tests/observe/test_tracing.py)."""

from __future__ import annotations

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict

from app.jobs.registry import JobContext, job_type


class TracedPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_times: int = 0


@job_type("test.traced")
async def traced(payload: TracedPayload, ctx: JobContext) -> dict[str, str]:
    """Works in a span of its own; fails its first ``fail_times`` attempts. Its result is the
    trace id the handler saw."""
    with trace.get_tracer("tests.handler").start_as_current_span("handler work"):
        if ctx.attempt <= payload.fail_times:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        return {"trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x")}
