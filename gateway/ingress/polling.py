"""HTTP polling of any topic: the events after an offset, from the topic's history.

``GET /topics/{topic}/events?since=OFFSET&limit=N`` answers::

    {"topic": ..., "events": [...], "nextOffset": N, "firstOffset": F,
     "lastOffset": L, "truncated": false, "more": false}

``events`` are the same JSON messages WebSocket subscribers get, in offset order,
each with its ``offset``. ``nextOffset`` is what to send as ``since`` next time.
``truncated`` is true when events after ``since`` are gone from the history (it
keeps ``--history-size`` per topic): the answer then starts at ``firstOffset``.

Polling reads by the same rules as WebSocket subscribing: without a token, the
anonymous rights (``--anonymous-read``); with a subscriber token (a bearer header or
the ``access_token`` query parameter), the topics it names. A job's topic is
readable by whoever holds its id.
"""

from __future__ import annotations

import hashlib
import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import BadRequest, ClientError, Forbidden, Unavailable
from gateway.events.topics import validate_topic
from gateway.ingress.http import error_response
from gateway.ingress.jobs import CACHE_CONTROL, etag_matches
from gateway.runtime import Runtime

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "routes"]

logger = logging.getLogger(__name__)

#: Events in one answer when the client gives no ``limit``.
DEFAULT_LIMIT = 100
#: Most events in one answer.
MAX_LIMIT = 1000
#: Longest ``since`` or ``limit`` read, in digits; 2**63 has 19.
_MAX_DIGITS = 32


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # isdigit alone also takes digits that int() refuses, such as '²', and
    # int() refuses thousands of digits: each would crash the handler.
    if (
        not raw.isascii()
        or not raw.isdigit()
        or len(raw) > _MAX_DIGITS
        or not low <= int(raw) <= high
    ):
        raise BadRequest(f"{name}: expected an integer from {low} to {high}")
    return int(raw)


async def topic_events(request: Request) -> Response:
    """GET /topics/{topic}/events: the events of one topic after ``since``."""
    runtime: Runtime = request.state.gateway
    settings = runtime.settings
    try:
        topic = validate_topic(
            request.path_params["topic"],
            max_length=settings.max_topic_length,
            max_depth=settings.max_topic_depth,
        )
        _check_read(runtime, request, topic)
        since = _int_param(request, "since", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        read = await runtime.backend.read_history(topic, since, limit)
    except ClientError as exc:
        logger.debug("topic poll refused: %s: %s", exc.code, exc)
        runtime.metrics.client_errors.labels(exc.code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, str(exc), headers)
    except Unavailable as exc:
        logger.debug("topic poll refused: %s", exc)
        return error_response(503, "unavailable", str(exc), {"Retry-After": "1"})
    if since > read.last_offset:
        return error_response(
            400,
            "offset_ahead",
            f"since {since} is beyond the last offset of {topic!r}, "
            f"{read.last_offset}: its history was reset; poll from 0",
        )
    events = read.events
    next_offset = events[-1].offset if events else since
    # Gone: the events between since and the oldest one kept (all of them when
    # nothing is kept but the topic has moved on).
    oldest = read.first_offset or read.last_offset + 1
    truncated = oldest > since + 1 and read.last_offset > since
    head = orjson.dumps({"topic": topic})[:-1]
    tail = orjson.dumps(
        {
            "nextOffset": next_offset,
            "firstOffset": read.first_offset,
            "lastOffset": read.last_offset,
            "truncated": truncated,
            "more": next_offset < read.last_offset,
        }
    )[1:]
    # The stored payloads go out as they are: no decoding, no second encoding.
    body = b'%b,"events":[%b],%b' % (head, b",".join(e.payload for e in events), tail)
    headers = {
        "ETag": _etag(topic, since, limit, read.first_offset, read.last_offset),
        "Cache-Control": CACHE_CONTROL,
        "Retry-After": str(settings.poll_interval),
    }
    if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type="application/json")


def _check_read(runtime: Runtime, request: Request, topic: str) -> None:
    """Refuse a poll that the caller's token, or the anonymous rights, forbid.

    Raises:
        Unauthorized: a bad or expired token, or none where one is needed.
        Forbidden: the rights do not cover ``topic``.
    """
    access = runtime.access
    token = access.token_of(str(request.url), request.headers.get("authorization"))
    rights = access.rights(access.admit(token))
    if not rights.allows(topic):
        raise Forbidden(f"not allowed to read {topic!r}")


def _etag(topic: str, since: int, limit: int, first: int, last: int) -> str:
    """What the answer depends on, hashed: it changes when the history moves."""
    key = f"{topic}\0{since}\0{limit}\0{first}\0{last}".encode()
    return f'"{hashlib.blake2b(key, digest_size=16).hexdigest()}"'


routes = [
    Route("/topics/{topic:path}/events", topic_events, methods=["GET"]),
]
