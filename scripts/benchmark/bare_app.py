"""The ceiling for the HTTP front door: a bare FastAPI POST that validates and answers 202.

Served like ``conveyor api``: ``python -m benchmark.bare_app --port P --workers 2``.
"""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    queue: str = "default"
    payload: dict[str, Any] = {}


class JobOut(JobIn):
    id: uuid.UUID
    status: str
    created_at: datetime


app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/jobs", status_code=202)
async def submit(body: JobIn) -> JobOut:
    return JobOut(
        **body.model_dump(), id=uuid.uuid4(), status="queued", created_at=datetime.now(UTC)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    uvicorn.run(
        "benchmark.bare_app:app",
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_level="warning",
        server_header=False,
    )
