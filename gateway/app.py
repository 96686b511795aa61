"""The Starlette application and the lifespan that owns the runtime."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.ingress.http import error_response, routes
from gateway.runtime import Runtime

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, "http_error", str(exc.detail), headers)


async def _crash(request: Request, exc: Exception) -> Response:
    logger.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the gateway failed; see its logs")


def create_app(runtime: Runtime) -> Starlette:
    """Build the application around a runtime that it starts and closes.

    The runtime is also the lifespan state, under the key ``gateway``: Starlette
    puts it on ``request.state`` and uvicorn hands it to the WebSocket transport.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Runtime]]:
        await runtime.start()
        try:
            yield {"gateway": runtime}
        finally:
            await runtime.close()

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _crash},
    )
