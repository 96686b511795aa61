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
from gateway.ingress.jobs import routes as job_routes
from gateway.ingress.openapi import routes as openapi_routes
from gateway.ingress.page import routes as page_routes
from gateway.ingress.polling import routes as polling_routes
from gateway.ingress.webhooks import WebhookReceiver
from gateway.ingress.webhooks import routes as webhook_routes
from gateway.jobs.service import JobService
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
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        await runtime.start()
        try:
            # The jobs API and this replica's job workers (see gateway/jobs).
            jobs = JobService.from_settings(
                runtime.settings,
                publish=runtime.publish,
                metrics=runtime.metrics,
                expire_topic=runtime.backend.expire_topic,
            )
            await jobs.start()
            webhooks = WebhookReceiver.from_settings(
                runtime.settings, lambda: runtime.keys.webhook_secrets
            )
            try:
                yield {"gateway": runtime, "jobs": jobs, "webhooks": webhooks}
            finally:
                await jobs.close()
        finally:
            await runtime.close()

    app = Starlette(
        routes=[
            *routes,
            *job_routes,
            *polling_routes,
            *webhook_routes,
            *page_routes,
            *openapi_routes,
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _crash},
    )
    # A path with a slash too many is unknown (a JSON 404), not a redirect to
    # the other spelling built from the request's Host header.
    app.router.redirect_slashes = False
    return app
