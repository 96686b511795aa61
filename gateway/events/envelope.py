"""The event envelope: validation at ingress, stamping and the one encoding.

A publisher sends ``topic``, ``eventSource``, ``eventType`` and ``eventDetails``. The
gateway adds ``id``, ``offset`` (per topic) and ``publishedAt``, encodes the result once
with orjson and keeps both the JSON payload and the WebSocket frame around it.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.errors import BadRequest, BadTopic, TooLarge
from gateway.events.frames import text_frame
from gateway.events.topics import validate_topic

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "Draft",
    "Encoded",
    "Event",
    "decode_event",
    "encode",
    "parse_drafts",
    "stamp",
    "validate_draft",
]

DEFAULT_MAX_EVENT_BYTES = 64 * 1024

_EVENT_TYPE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
_FIELDS = frozenset({"topic", "eventSource", "eventType", "eventDetails"})
_MAX_SOURCE_LENGTH = 128
_MAX_TYPE_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated envelope that has not been stamped yet."""

    topic: str
    source: str
    type: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    """One stamped event, encoded once.

    Attributes:
        topic: the topic it was published on.
        offset: its position in the topic's history, starting at 1.
        id: unique id, 32 hex digits.
        published_at: when the gateway accepted it, in seconds since the epoch.
        payload: the JSON message sent to subscribers and kept in history.
        frame: ``payload`` inside one WebSocket text frame.
    """

    topic: str
    offset: int
    id: str
    published_at: float
    payload: bytes
    frame: bytes


def validate_draft(
    item: object,
    *,
    max_topic_length: int,
    max_topic_depth: int,
    where: str = "event",
) -> Draft:
    """Check one publish item and turn it into a draft.

    Args:
        item: one element of a decoded publish body.
        max_topic_length: longest accepted topic, in characters.
        max_topic_depth: most levels accepted in a topic.
        where: how error messages name the item, such as ``events[3]``.

    Returns:
        The draft.

    Raises:
        BadRequest: a field is missing, unknown or of the wrong type.
        BadTopic: the topic breaks the grammar.
    """
    if not isinstance(item, dict):
        raise BadRequest(f"{where}: expected an object, got {type(item).__name__}")
    unknown = item.keys() - _FIELDS
    if unknown:
        raise BadRequest(f"{where}: unknown field {sorted(unknown)[0]!r}")
    for field in ("topic", "eventSource", "eventType", "eventDetails"):
        if field not in item:
            raise BadRequest(f"{where}: missing field {field!r}")
    try:
        topic = validate_topic(
            item["topic"], max_length=max_topic_length, max_depth=max_topic_depth
        )
    except BadTopic as exc:
        raise BadTopic(f"{where}.topic: {exc}") from exc
    source = item["eventSource"]
    if (
        not isinstance(source, str)
        or not 0 < len(source) <= _MAX_SOURCE_LENGTH
        or not source.isprintable()
    ):
        # Printable only: a source names a sender in logs and pages, where NUL,
        # newlines or terminal escapes would do harm.
        raise BadRequest(
            f"{where}.eventSource: expected a string of 1 to "
            f"{_MAX_SOURCE_LENGTH} printable characters"
        )
    event_type = item["eventType"]
    if (
        not isinstance(event_type, str)
        or len(event_type) > _MAX_TYPE_LENGTH
        or not _EVENT_TYPE.fullmatch(event_type)
    ):
        raise BadRequest(
            f"{where}.eventType: expected UPPER_SNAKE_CASE such as PRICE_CHANGED"
        )
    details = item["eventDetails"]
    if not isinstance(details, dict):
        raise BadRequest(f"{where}.eventDetails: expected an object")
    return Draft(topic, source, event_type, details)


def parse_drafts(
    body: bytes,
    *,
    max_topic_length: int,
    max_topic_depth: int,
    max_batch: int,
) -> list[Draft]:
    """Decode a publish body: one envelope object or an array of them.

    Raises:
        BadRequest: the body is not JSON, is empty, or holds a bad item.
        BadTopic: an item's topic breaks the grammar.
        TooLarge: the array holds more than ``max_batch`` items.
    """
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="bad_json") from exc
    if isinstance(decoded, dict):
        items: list[object] = [decoded]
        names = ["event"]
    elif isinstance(decoded, list):
        if not decoded:
            raise BadRequest("body is an empty array")
        if len(decoded) > max_batch:
            raise TooLarge(f"more than {max_batch} events in one request")
        items = decoded
        names = [f"events[{index}]" for index in range(len(items))]
    else:
        raise BadRequest("body must be an event object or an array of them")
    return [
        validate_draft(
            item,
            max_topic_length=max_topic_length,
            max_topic_depth=max_topic_depth,
            where=name,
        )
        for item, name in zip(items, names, strict=True)
    ]


def _iso(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Encoded:
    """An envelope encoded around the one field not known yet: its offset.

    A backend that hands out offsets elsewhere (inside Redis) joins ``head``, the
    offset's digits and ``tail``; the bytes are the same as ``stamp`` makes.
    """

    topic: str
    id: str
    published_at: float
    head: bytes
    tail: bytes

    def with_offset(self, offset: int) -> Event:
        """The complete event at ``offset``."""
        payload = b"%b%d%b" % (self.head, offset, self.tail)
        return Event(
            self.topic, offset, self.id, self.published_at, payload, text_frame(payload)
        )


# Room kept for the offset's digits when checking an event's size.
_OFFSET_DIGITS = 20


def encode(draft: Draft, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Encoded:
    """Give a draft its id and publish time and encode it, offset left out.

    Args:
        draft: the validated envelope.
        max_bytes: largest accepted encoded event, in bytes, offset included.

    Raises:
        TooLarge: the encoded event would be longer than ``max_bytes``.
    """
    event_id = uuid.uuid4().hex
    published_at = time.time()
    head = b'{"type":"event","topic":%b,"offset":' % orjson.dumps(draft.topic)
    try:
        rest = orjson.dumps(
            {
                "id": event_id,
                "publishedAt": _iso(published_at),
                "eventSource": draft.source,
                "eventType": draft.type,
                "eventDetails": draft.details,
            }
        )
    except orjson.JSONEncodeError as exc:
        # The encoder stops at 254 levels of nesting, fewer than the decoder.
        raise BadRequest(
            f"eventDetails for {draft.topic!r} cannot be encoded: {exc}"
        ) from exc
    tail = b"," + rest[1:]
    size = len(head) + len(tail) + _OFFSET_DIGITS
    if size > max_bytes:
        raise TooLarge(
            f"event for {draft.topic!r} is {size} bytes encoded, "
            f"over the limit of {max_bytes}"
        )
    return Encoded(draft.topic, event_id, published_at, head, tail)


def stamp(
    draft: Draft, offset: int, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> Event:
    """Give a draft its id, offset and publish time, and encode it once.

    Raises:
        TooLarge: the encoded event is longer than ``max_bytes``.
    """
    return encode(draft, max_bytes=max_bytes).with_offset(offset)


def decode_event(payload: bytes) -> Event:
    """Rebuild an event from its encoded payload, as stored or relayed.

    Raises:
        ValueError: the payload is not an event the gateway encoded.
    """
    body = orjson.loads(payload)
    try:
        published = datetime.fromisoformat(body["publishedAt"]).timestamp()
        return Event(
            body["topic"],
            int(body["offset"]),
            body["id"],
            published,
            payload,
            text_frame(payload),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a gateway event: {exc}") from exc
