"""A job type with a typed result, for the generated-client tests (tests/api/test_openapi.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from 3.12

from app.jobs.registry import JobContext, job_type


class ResizePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = Field(ge=1, le=10_000)
    height: int = Field(ge=1, le=10_000)
    scale: float = Field(default=0.5, gt=0, le=1)


class ResizeResult(TypedDict):
    width: int
    height: int
    format: Literal["png", "jpeg"]


@job_type("test.resize")
async def resize(payload: ResizePayload, ctx: JobContext) -> ResizeResult:
    """Answers the scaled size, as an image resizer would."""
    return {
        "width": round(payload.width * payload.scale),
        "height": round(payload.height * payload.scale),
        "format": "png",
    }
