"""HTTP handlers of the gateway: publish, health, readiness, metrics, admin."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import (
    BadRequest,
    ClientError,
    Forbidden,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from gateway.events.envelope import parse_drafts
from gateway.runtime import Runtime
from gateway.security.keys import Principal
from gateway.state.base import AlreadyPublished, Once

__all__ = ["error_response", "routes"]

logger = logging.getLogger(__name__)

#: Seconds a publisher has to send its whole body; a stalled upload is refused
#: before it can hold a graceful shutdown up.
_BODY_TIMEOUT = 5.0
#: The header that makes a publish happen at most once, and what it may hold.
IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:=+/-]{1,128}")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON body every HTTP error of the gateway has."""
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status, headers=headers
    )


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.gateway
    return runtime


def _check_api_key(request: Request, runtime: Runtime) -> Principal:
    """The holder of the request's bearer key.

    Raises:
        Unauthorized: no bearer key, or one the gateway does not know.
    """
    return runtime.keys.authenticate(request.headers.get("authorization"))


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body is {declared} bytes, over the limit of {limit}")
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(_BODY_TIMEOUT):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise BadRequest(
            f"body not received within {_BODY_TIMEOUT:.0f} s", code="body_timeout"
        ) from exc
    return b"".join(chunks)


async def publish(request: Request) -> Response:
    """POST /events: publish one event or an array of them."""
    runtime = _runtime(request)
    settings = runtime.settings
    try:
        principal = _check_api_key(request, runtime)
        body = await _read_body(request, settings.max_body_bytes)
        drafts = parse_drafts(
            body,
            max_topic_length=settings.max_topic_length,
            max_topic_depth=settings.max_topic_depth,
            max_batch=settings.max_batch,
        )
        # A batch is all or nothing: one topic out of the key's scope refuses it.
        principal.check_publish(draft.topic for draft in drafts)
        once = _once(request, principal, body, settings.idempotency_ttl)
        events = await runtime.publish(drafts, once=once)
    except AlreadyPublished as repeat:
        return _repeated(runtime, repeat, once)
    except ClientDisconnect:
        # The publisher left before sending its whole body: nothing to answer.
        logger.debug("publisher disconnected before its body was complete")
        return Response(status_code=400)
    except ClientError as exc:
        logger.debug("publish refused: %s: %s", exc.code, exc)
        runtime.metrics.client_errors.labels(exc.code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, str(exc), headers)
    except Unavailable as exc:
        # The backend logs its outage once; a line per refused request would
        # flood the log while it lasts.
        logger.debug("publish refused: %s", exc)
        return error_response(
            503, "unavailable", str(exc), headers={"Retry-After": "1"}
        )
    return JSONResponse(
        {
            "events": [
                {"id": event.id, "topic": event.topic, "offset": event.offset}
                for event in events
            ]
        }
    )


def _once(
    request: Request, principal: Principal, body: bytes, ttl: float
) -> Once | None:
    """The ``Once`` of a publish that carries an ``Idempotency-Key``, else None.

    Raises:
        BadRequest: the key is empty, too long or holds other characters.
    """
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(
            f"{IDEMPOTENCY_HEADER}: expected 1 to 128 of A-Z a-z 0-9 _ . : = + / -",
            code="bad_idempotency_key",
        )
    # Keys are per publish key, so that two publishers cannot collide.
    fingerprint = hashlib.sha256(body).hexdigest()
    return Once(f"publish:{principal.name}:{key}", fingerprint, ttl)


def _repeated(
    runtime: Runtime, repeat: AlreadyPublished, once: Once | None
) -> Response:
    """The answer to a publish whose idempotency key was used before."""
    assert once is not None
    if repeat.fingerprint != once.fingerprint:
        logger.debug("publish refused: idempotency key reused for another body")
        runtime.metrics.client_errors.labels("idempotency_key_reused").inc()
        return error_response(
            422,
            "idempotency_key_reused",
            f"this {IDEMPOTENCY_HEADER} was used for another body; use a new key "
            "for a new publish",
        )
    body = {
        "events": [
            {"id": ref.id, "topic": ref.topic, "offset": ref.offset}
            for ref in repeat.events
        ]
    }
    return JSONResponse(body, headers={"Idempotent-Replayed": "true"})


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is alive and its event loop answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: this replica should get new clients and publishes."""
    runtime = _runtime(request)
    backend_ready = runtime.backend.is_ready()
    ready = backend_ready and not runtime.draining
    mqtt = runtime.mqtt
    body = {
        "status": "ready" if ready else "unavailable",
        "draining": runtime.draining,
        "backend": {"name": runtime.backend.name, "ready": backend_ready},
        # The broker's state is reported but does not make the replica unready:
        # WebSocket push works without it and MQTT events wait in a buffer.
        "mqtt": {
            "enabled": mqtt is not None,
            "connected": mqtt is not None and mqtt.connected,
            "buffered": 0 if mqtt is None else mqtt.buffered(),
        },
        "replica": runtime.settings.replica,
    }
    return JSONResponse(body, 200 if ready else 503)


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text format."""
    registry = _runtime(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def admin_stats(request: Request) -> Response:
    """GET /admin/stats: connections, and per topic the subscribers and last offset."""
    runtime = _runtime(request)
    try:
        _check_api_key(request, runtime).check_admin()
    except Unauthorized as exc:
        return error_response(401, exc.code, str(exc), {"WWW-Authenticate": "Bearer"})
    except Forbidden as exc:
        return error_response(403, exc.code, str(exc))
    backend = runtime.backend
    try:
        topics = await backend.topic_stats()
        connections = await backend.connection_count()
    except Unavailable as exc:
        return error_response(
            503, "unavailable", str(exc), headers={"Retry-After": "1"}
        )
    return JSONResponse(
        {
            "connections": connections,
            "topics": [
                {
                    "topic": item.name,
                    "subscribers": item.subscribers,
                    "lastOffset": item.last_offset,
                }
                for item in topics
            ],
        }
    )


async def websocket_only(request: Request) -> Response:
    """GET /ws without an upgrade: say that this is a WebSocket endpoint."""
    return error_response(
        426,
        "upgrade_required",
        "/ws is a WebSocket endpoint; connect with a WebSocket client",
        {"Upgrade": "websocket", "Connection": "Upgrade"},
    )


routes = [
    Route("/ws", websocket_only, methods=["GET"]),
    Route("/events", publish, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/admin/stats", admin_stats, methods=["GET"]),
]
