"""The browser page: ``/``, its configuration, its files, and its demo jobs.

The page (``gateway/web/static/``) follows the same feeds over HTTP polling,
WebSocket and MQTT over WebSocket side by side. It learns where to connect from
``GET /page/config.json``. Its MQTT client is the browser bundle of the npm package
``mqtt``, installed into ``gateway/web/node_modules`` by ``deploy/dev/install.sh``
(``npm ci``) and served at ``/vendor/mqtt.min.js``; when it is not installed the
configuration says so and the page shows its MQTT column as unavailable.

Starting a job needs the API key (``POST /jobs``). So that a newcomer can press a
button on the page without pasting a key, ``POST /demo/jobs`` starts one
``db-refresh`` job of bounded length without it, but only when
``--demo-page-jobs`` is on, which ``gateway demo`` implies and ``gateway serve``
does not; elsewhere it answers 404 and the page asks for the key instead.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.config import Settings
from gateway.errors import BadRequest, ClientError, Unavailable
from gateway.ingress.http import _read_body, error_response
from gateway.ingress.jobs import CACHE_CONTROL
from gateway.jobs.service import JobService
from gateway.runtime import Runtime

__all__ = [
    "DEMO_JOB_HEADER",
    "DEMO_JOBS_PER_MINUTE",
    "MQTT_BUNDLE",
    "page_config",
    "routes",
]

logger = logging.getLogger(__name__)

_WEB = Path(__file__).resolve().parent.parent / "web"
_STATIC = _WEB / "static"
#: The browser build of the MQTT client, where ``npm ci`` in ``gateway/web`` puts it.
MQTT_BUNDLE = _WEB / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"

#: Header the page sends with ``POST /demo/jobs``. A form on another site cannot
#: set it without a CORS preflight, which the gateway never grants, so such a site
#: cannot make a visitor's browser start jobs on a local demo gateway.
DEMO_JOB_HEADER = "x-gateway-page"
#: Demo jobs a replica starts in any 60 s; more are refused with 429.
DEMO_JOBS_PER_MINUTE = 10
#: Shortest and longest demo job the page may ask for, in seconds.
_DEMO_SECONDS = (2.0, 300.0)
_DEFAULT_DEMO_SECONDS = 20.0
#: Steps of a db-refresh job; a demo job spreads its length over them.
_DB_REFRESH_STEPS = 4


def page_config(settings: Settings, request_host: str | None) -> dict[str, object]:
    """What the page needs to know to connect, as served by ``/page/config.json``.

    Args:
        settings: the replica's settings.
        request_host: the host name the page was loaded from (no port), put in
            place of ``{host}`` in ``--mqtt-public-ws-url``.
    """
    mqtt_url, unavailable = _mqtt_ws_url(settings, request_host)
    if mqtt_url is not None and not MQTT_BUNDLE.is_file():
        mqtt_url = None
        unavailable = (
            "the browser MQTT client is not installed on this gateway: run "
            "deploy/dev/install.sh (npm ci in gateway/web)"
        )
    return {
        "wsPath": "/ws",
        "pollInterval": settings.poll_interval,
        "mqtt": {
            "url": mqtt_url,
            "prefix": settings.mqtt_prefix,
            "script": "/vendor/mqtt.min.js" if mqtt_url else None,
            "unavailable": unavailable,
        },
        "jobs": {
            "demo": settings.demo_page_jobs,
            "path": "/demo/jobs" if settings.demo_page_jobs else "/jobs",
            "maxSeconds": _DEMO_SECONDS[1],
        },
    }


def _mqtt_ws_url(
    settings: Settings, request_host: str | None
) -> tuple[str | None, str | None]:
    """The broker's WebSocket URL for browsers, or None and the reason why not."""
    template = settings.mqtt_public_ws_url
    if template is None:
        if settings.mqtt_url is None:
            return None, "MQTT is off on this gateway"
        return None, (
            "this gateway publishes to an outside broker; set "
            "--mqtt-public-ws-url to its MQTT over WebSocket address"
        )
    host = request_host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return template.replace("{host}", host), None


async def index(request: Request) -> Response:
    """GET /: the page itself."""
    return FileResponse(_STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def config(request: Request) -> Response:
    """GET /page/config.json: where the page connects, and how it starts jobs."""
    runtime: Runtime = request.state.gateway
    body = page_config(runtime.settings, request.url.hostname)
    return JSONResponse(body, headers={"Cache-Control": "no-cache"})


async def mqtt_bundle(request: Request) -> Response:
    """GET /vendor/mqtt.min.js: the MQTT client's browser bundle, when installed."""
    if not MQTT_BUNDLE.is_file():
        return error_response(
            404,
            "not_installed",
            "the browser MQTT client is not installed: run deploy/dev/install.sh",
        )
    return FileResponse(MQTT_BUNDLE, media_type="text/javascript")


class _DemoJobLimiter:
    """Counts the demo jobs of the last minute; one per replica."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        # Monotonic start times of the demo jobs of the last 60 s, oldest first.
        self._starts: deque[float] = deque()

    def take(self) -> float:
        """Record a start and return 0, or return the seconds until one is allowed."""
        now = time.monotonic()
        while self._starts and now - self._starts[0] >= 60.0:
            self._starts.popleft()
        if len(self._starts) >= self.per_minute:
            return 60.0 - (now - self._starts[0])
        self._starts.append(now)
        return 0.0


def _demo_seconds(body: bytes) -> float:
    """The job length asked for in ``{"seconds": N}``; the default for no body."""
    if not body.strip():
        return _DEFAULT_DEMO_SECONDS
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="bad_json") from exc
    if not isinstance(decoded, dict) or set(decoded) - {"seconds"}:
        raise BadRequest('expected {"seconds": N} or no body')
    seconds = decoded.get("seconds", _DEFAULT_DEMO_SECONDS)
    low, high = _DEMO_SECONDS
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not low <= seconds <= high
    ):
        raise BadRequest(f"seconds: expected a number from {low:g} to {high:g}")
    return float(seconds)


#: One per process, which serves one application.
_limiter = _DemoJobLimiter(DEMO_JOBS_PER_MINUTE)


async def demo_job(request: Request) -> Response:
    """POST /demo/jobs: start a demo db-refresh job without the API key."""
    runtime: Runtime = request.state.gateway
    jobs: JobService = request.state.jobs
    if not runtime.settings.demo_page_jobs:
        return error_response(
            404, "not_found", "demo jobs are off; start jobs with POST /jobs"
        )
    try:
        if request.headers.get(DEMO_JOB_HEADER) != "1":
            raise BadRequest(f"send the header {DEMO_JOB_HEADER}: 1")
        seconds = _demo_seconds(await _read_body(request, 1024))
        wait = _limiter.take()
        if wait > 0:
            return error_response(
                429,
                "too_many_jobs",
                f"at most {DEMO_JOBS_PER_MINUTE} demo jobs a minute",
                {"Retry-After": str(int(wait) + 1)},
            )
        job = await jobs.submit(
            "db-refresh",
            {"step_seconds": seconds / _DB_REFRESH_STEPS, "database": "demo"},
        )
    except ClientDisconnect:
        return Response(status_code=400)
    except ClientError as exc:
        logger.debug("demo job refused: %s: %s", exc.code, exc)
        runtime.metrics.client_errors.labels(exc.code).inc()
        return error_response(exc.status, exc.code, str(exc))
    except Unavailable as exc:
        logger.debug("demo job refused: %s", exc)
        return error_response(503, "unavailable", str(exc), {"Retry-After": "1"})
    location = f"/jobs/{job.id}"
    return JSONResponse(
        {"id": job.id, "statusUrl": location, "topic": job.topic},
        202,
        headers={"Location": location, "Cache-Control": CACHE_CONTROL},
    )


routes = [
    Route("/", index, methods=["GET"]),
    Route("/page/config.json", config, methods=["GET"]),
    Route("/vendor/mqtt.min.js", mqtt_bundle, methods=["GET"]),
    Route("/demo/jobs", demo_job, methods=["POST"]),
    Mount("/static", StaticFiles(directory=_STATIC), name="static"),
]
