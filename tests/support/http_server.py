"""A throwaway ASGI app served by uvicorn on a loopback port, inside the test's event loop:
webhook receivers, alert receivers, targets of ``http.request`` jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int) -> AsyncIterator[None]:
    """Serve ``app`` on ``127.0.0.1:port`` until the block ends."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # it could not start (the port was taken): say why
            await task
            raise RuntimeError(f"the test server on port {port} did not start")
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
