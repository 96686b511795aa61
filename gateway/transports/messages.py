"""The WebSocket JSON protocol: client operations in, control messages out.

Pure functions with no I/O. ``docs/protocol.md`` is the client-facing description;
the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import BadRequest, BadTopic, LimitExceeded
from gateway.events.frames import text_frame
from gateway.events.topics import filter_matches, validate_filter, validate_topic

__all__ = [
    "Authenticate",
    "Ping",
    "Subscribe",
    "Unsubscribe",
    "control_frame",
    "error_frame",
    "parse_operation",
    "request_ref",
]

_MAX_REF_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Add topic filters, optionally resuming named topics after an offset."""

    filters: tuple[str, ...]
    offsets: dict[str, int] = field(default_factory=dict)
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Drop topic filters."""

    filters: tuple[str, ...]
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Ask for a ``pong`` message (an application-level liveness check)."""

    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Replace the connection's token with a fresh one (before it expires)."""

    token: str
    ref: str | int | None = None


Operation = Subscribe | Unsubscribe | Ping | Authenticate

#: Longest token accepted in an ``auth`` message, in characters.
_MAX_TOKEN_LENGTH = 8192


def _ref(message: dict[str, Any]) -> str | int | None:
    ref = message.get("ref")
    if ref is None or (isinstance(ref, int) and not isinstance(ref, bool)):
        return ref
    if isinstance(ref, str) and len(ref) <= _MAX_REF_LENGTH:
        return ref
    raise BadRequest(
        f"'ref' must be an integer or a string of at most {_MAX_REF_LENGTH} characters",
        code="bad_field",
    )


def _filters(
    message: dict[str, Any], *, max_count: int, max_length: int, max_depth: int
) -> tuple[str, ...]:
    topics = message.get("topics")
    if not isinstance(topics, list) or not topics:
        raise BadRequest(
            "'topics' must be a non-empty array of strings", code="bad_field"
        )
    if len(topics) > max_count:
        raise LimitExceeded(f"more than {max_count} topics in one operation")
    filters = [
        validate_filter(name, max_length=max_length, max_depth=max_depth)
        for name in topics
    ]
    # Keep the client's order but drop repeats: one subscription per filter.
    return tuple(dict.fromkeys(filters))


def _offsets(
    message: dict[str, Any],
    filters: tuple[str, ...],
    *,
    max_length: int,
    max_depth: int,
) -> dict[str, int]:
    offsets = message.get("offsets")
    if offsets is None:
        return {}
    if not isinstance(offsets, dict):
        raise BadRequest(
            "'offsets' must map topic names to the last offset seen", code="bad_field"
        )
    if len(offsets) > len(filters) * 64:
        raise LimitExceeded("too many topics in 'offsets'")
    result: dict[str, int] = {}
    for topic, offset in offsets.items():
        validate_topic(topic, max_length=max_length, max_depth=max_depth)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BadRequest(
                f"offset for {topic!r} must be a non-negative integer", code="bad_field"
            )
        if not any(filter_matches(f, topic) for f in filters):
            raise BadTopic(f"offset given for {topic!r}, which no topic filter matches")
        result[topic] = offset
    return result


def parse_operation(
    text: str, *, max_subscriptions: int, max_topic_length: int, max_topic_depth: int
) -> Operation:
    """Decode one client text message into an operation.

    Args:
        text: the message as received, already valid UTF-8.
        max_subscriptions: most topics accepted in one operation.
        max_topic_length: longest accepted filter, in characters.
        max_topic_depth: most levels in a filter.

    Raises:
        BadRequest: not JSON, not an object, unknown op or a bad field.
        BadTopic: a filter breaks the topic grammar.
        LimitExceeded: too many topics in one operation.
    """
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"message is not valid JSON: {exc}", code="bad_json") from exc
    if not isinstance(message, dict):
        raise BadRequest(
            f"message must be a JSON object, not {type(message).__name__}",
            code="bad_message",
        )
    ref = _ref(message)
    op = message.get("op")
    limits = {"max_length": max_topic_length, "max_depth": max_topic_depth}
    if op == "subscribe":
        filters = _filters(message, max_count=max_subscriptions, **limits)
        return Subscribe(filters, _offsets(message, filters, **limits), ref)
    if op == "unsubscribe":
        return Unsubscribe(
            _filters(message, max_count=max_subscriptions, **limits), ref
        )
    if op == "ping":
        return Ping(ref)
    if op == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN_LENGTH:
            raise BadRequest(
                f"'token' must be a string of 1 to {_MAX_TOKEN_LENGTH} characters",
                code="bad_field",
            )
        return Authenticate(token, ref)
    if not isinstance(op, str):
        raise BadRequest("'op' must be a string", code="unknown_op")
    raise BadRequest(
        f"unknown op {op[:40]!r}; expected subscribe, unsubscribe, ping or auth",
        code="unknown_op",
    )


def request_ref(text: str) -> str | int | None:
    """The valid ``ref`` of a client message, to echo in an error, else None."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    try:
        return _ref(message)
    except BadRequest:
        return None


def control_frame(message_type: str, **fields: Any) -> bytes:
    """Encode one server control message (not an event) as a text frame."""
    body = {"type": message_type}
    body.update({key: value for key, value in fields.items() if value is not None})
    return text_frame(orjson.dumps(body))


def error_frame(code: str, message: str, ref: str | int | None = None) -> bytes:
    """Encode an error message that leaves the connection open."""
    return control_frame("error", code=code, message=message, ref=ref)
