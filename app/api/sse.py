"""Server-Sent Events framing (``text/event-stream``) for ``?follow=true``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.responses import StreamingResponse

from app.jobs.follow import Update

MEDIA_TYPE = "text/event-stream"


def frame(update: Update) -> bytes:
    """One event: ``id`` (transitions only, so a reconnect resumes after it with
    ``Last-Event-ID``), ``event`` and one ``data`` line of JSON; a keepalive is a comment."""
    if update.kind == "keepalive":
        return b": keepalive\n\n"
    head = f"id: {update.id}\n" if update.id is not None else ""
    data = orjson.dumps(update.data, option=orjson.OPT_UTC_Z)
    return f"{head}event: {update.kind}\n".encode() + b"data: " + data + b"\n\n"


async def _frames(updates: AsyncIterator[Update]) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    async for update in updates:
        yield frame(update)


def stream(updates: AsyncIterator[Update]) -> StreamingResponse:
    return StreamingResponse(
        _frames(updates),
        media_type=MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def last_event_id(header: str | None) -> int | None:
    """A reconnecting client's ``Last-Event-ID`` (ours are event ids); anything else: none."""
    if header is None or not header.isdigit() or len(header) > 18:
        return None
    return int(header)
