"""Signed webhooks from third-party feeds: ``POST /webhooks/fixtures``.

A sender signs each delivery with a shared secret (``webhook_secret``, or one of
the keys file's ``webhook_secrets``; every one listed is valid, for rotation)::

    X-Webhook-Timestamp: <Unix seconds>
    X-Webhook-Signature: sha256=<hex of HMAC-SHA256(secret, f"{timestamp}." + body)>

The signature covers the exact bytes of the body, so the gateway checks it before
decoding anything, and the timestamp, so a captured delivery cannot be replayed once
it is older than ``webhook_tolerance``. Each payload carries an event id; a repeated
delivery of an id already accepted is acknowledged without being published again
(the state backend remembers the id with the events, see ``Once``).
The scheme and the payload are described in ``docs/webhooks.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import Settings
from gateway.errors import BadRequest, ClientError, Unauthorized, Unavailable
from gateway.events.envelope import Draft
from gateway.ingress.http import _read_body, error_response
from gateway.runtime import Runtime
from gateway.state.base import AlreadyPublished, Once

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "FixtureEvent",
    "WebhookReceiver",
    "parse_fixture_event",
    "routes",
    "signature",
]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Webhook-Signature"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
#: The event source of everything published from the fixtures webhook.
FIXTURES_SOURCE = "fixtures-webhook"

#: Largest webhook body, in bytes; a key event is a few hundred.
_MAX_BODY = 64 * 1024

_EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_EVENT_TYPE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
_TEAM = re.compile(r"[A-Z][A-Z0-9]{1,7}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"id", "type", "fixture", "minute", "details"})
_FIXTURE_FIELDS = frozenset({"date", "home", "away", "competition", "stage"})
_MAX_MINUTE = 200
_MAX_LABEL = 128


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``timestamp``, a dot and ``body`` under ``secret``."""
    message = timestamp.encode() + b"." + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


# Verifying and decoding deliveries.


@dataclass(frozen=True, slots=True)
class FixtureEvent:
    """One decoded key event of a fixture."""

    id: str
    type: str
    date: str
    home: str
    away: str
    minute: int
    fixture: dict[str, str]
    details: dict[str, Any]

    @property
    def topic(self) -> str:
        """The fixture's topic, such as ``fixtures/2022-12-18/ARG-FRA``."""
        return f"fixtures/{self.date}/{self.home}-{self.away}"

    def drafts(self) -> list[Draft]:
        """The event on the fixture's topic and on both teams' topics."""
        details = {
            "eventId": self.id,
            "fixture": self.fixture,
            "minute": self.minute,
            "details": self.details,
        }
        topics = [self.topic, f"teams/{self.home}", f"teams/{self.away}"]
        return [Draft(topic, FIXTURES_SOURCE, self.type, details) for topic in topics]


class WebhookReceiver:
    """Checks signed deliveries and remembers which event ids were accepted.

    Args:
        secrets: gives the secrets a delivery may be signed with now (several
            during a rotation); none turns the webhook off.
        tolerance: seconds a timestamp may differ from ``clock``.
        remember: seconds an accepted event id is remembered.
        clock: wall clock, in seconds since the epoch.
    """

    def __init__(
        self,
        secrets: Callable[[], Sequence[bytes]],
        *,
        tolerance: float,
        remember: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secrets = secrets
        self.tolerance = tolerance
        self.remember = remember
        self._clock = clock

    @classmethod
    def from_settings(
        cls, settings: Settings, secrets: Callable[[], Sequence[bytes]]
    ) -> WebhookReceiver:
        """The receiver the settings describe.

        Args:
            settings: the gateway's settings.
            secrets: the signing secrets in force (the key ring's, which follows
                ``--webhook-secret`` and the keys file).
        """
        return cls(
            secrets,
            tolerance=settings.webhook_tolerance,
            remember=settings.webhook_dedupe_ttl,
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check the delivery's timestamp and signature over the exact ``body``.

        Raises:
            Unauthorized: a header is missing or garbled, the timestamp is too
                far from now, or no signature matches.
        """
        timestamp = headers.get(TIMESTAMP_HEADER)
        if timestamp is None:
            raise Unauthorized(f"missing {TIMESTAMP_HEADER} header")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise Unauthorized(f"{TIMESTAMP_HEADER}: expected Unix seconds")
        age = self._clock() - int(timestamp)
        if abs(age) > self.tolerance:
            side = "behind" if age > 0 else "ahead of"
            raise Unauthorized(
                f"{TIMESTAMP_HEADER} is {abs(age):.0f} s {side} the gateway's "
                f"clock, over the tolerance of {self.tolerance:.0f} s"
            )
        given = _signatures(headers.get(SIGNATURE_HEADER))
        expected = [signature(s, timestamp, body).encode() for s in self.secrets()]
        # Every candidate is compared with every secret's signature, in constant
        # time each, so that timings tell nothing about how much of a forged
        # signature was right, nor which secret came close.
        matched = False
        for candidate in given:
            for digest in expected:
                matched |= hmac.compare_digest(candidate.encode(), digest)
        if not matched:
            raise Unauthorized("signature does not match the body")


def _signatures(header: str | None) -> list[str]:
    """The hex digests of a signature header; several allow rotating secrets."""
    if header is None:
        raise Unauthorized(f"missing {SIGNATURE_HEADER} header")
    digests = []
    for part in header.split(","):
        scheme, _, digest = part.strip().partition("=")
        if scheme != "sha256" or not _HEX_DIGEST.fullmatch(digest):
            raise Unauthorized(f"{SIGNATURE_HEADER}: expected sha256=<64 hex digits>")
        digests.append(digest)
    return digests


def parse_fixture_event(body: bytes) -> FixtureEvent:
    """Decode a fixtures webhook payload; see ``docs/webhooks.md``.

    Raises:
        BadRequest: the body is not JSON, or a field is missing, unknown or
            malformed; the message names the field.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="bad_json") from exc
    if not isinstance(payload, dict):
        raise BadRequest("body must be a JSON object")
    unknown = payload.keys() - _FIELDS
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    event_id = _required(payload, "id", str)
    if not _EVENT_ID.fullmatch(event_id):
        raise BadRequest("id: expected 1 to 128 of A-Z a-z 0-9 _ . : -")
    event_type = _required(payload, "type", str)
    if len(event_type) > 64 or not _EVENT_TYPE.fullmatch(event_type):
        raise BadRequest("type: expected UPPER_SNAKE_CASE such as GOAL_SCORED")
    minute = _required(payload, "minute", int)
    if isinstance(minute, bool) or not 0 <= minute <= _MAX_MINUTE:
        raise BadRequest(f"minute: expected a whole number from 0 to {_MAX_MINUTE}")
    details = payload.get("details", {})
    if not isinstance(details, dict):
        raise BadRequest("details: expected an object")
    fixture = _fixture(_required(payload, "fixture", dict))
    return FixtureEvent(
        event_id,
        event_type,
        fixture["date"],
        fixture["home"],
        fixture["away"],
        minute,
        fixture,
        details,
    )


def _required(payload: dict[str, Any], field: str, kind: type) -> Any:
    if field not in payload:
        raise BadRequest(f"missing field {field!r}")
    value = payload[field]
    if not isinstance(value, kind):
        raise BadRequest(f"{field}: expected {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {str: "a string", int: "a whole number", dict: "an object"}


def _fixture(fixture: dict[str, Any]) -> dict[str, str]:
    unknown = fixture.keys() - _FIXTURE_FIELDS
    if unknown:
        raise BadRequest(f"unknown field 'fixture.{sorted(unknown)[0]}'")
    if "date" not in fixture:
        raise BadRequest("missing field 'fixture.date'")
    day = fixture["date"]
    if not isinstance(day, str) or not _is_date(day):
        raise BadRequest("fixture.date: expected a date such as 2022-12-18")
    checked = {"date": day}
    for side in ("home", "away"):
        code = fixture.get(side)
        if code is None:
            raise BadRequest(f"missing field 'fixture.{side}'")
        if not isinstance(code, str) or not _TEAM.fullmatch(code):
            raise BadRequest(f"fixture.{side}: expected a team code such as ARG")
        checked[side] = code
    if checked["home"] == checked["away"]:
        raise BadRequest("fixture.away: a team cannot play itself")
    for label in ("competition", "stage"):
        if label in fixture:
            value = fixture[label]
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_LABEL:
                raise BadRequest(
                    f"fixture.{label}: expected a string of 1 to {_MAX_LABEL} "
                    "characters"
                )
            checked[label] = value
    return checked


def _is_date(text: str) -> bool:
    if not _DATE.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


# The route.


async def fixtures_webhook(request: Request) -> Response:
    """POST /webhooks/fixtures: publish one signed key event of a fixture."""
    runtime: Runtime = request.state.gateway
    receiver: WebhookReceiver = request.state.webhooks
    if not receiver.secrets():
        return error_response(
            503,
            "webhooks_off",
            "webhooks are off: the gateway has no --webhook-secret "
            "(GATEWAY_WEBHOOK_SECRET) and no webhook secret in --keys-file",
        )
    try:
        body = await _read_body(request, _MAX_BODY)
        # Nothing of the body is decoded before its signature is checked.
        receiver.verify(request.headers, body)
        fixture_event = parse_fixture_event(body)
        return await _accept(runtime, receiver, fixture_event)
    except ClientDisconnect:
        logger.debug("webhook sender disconnected before its body was complete")
        return Response(status_code=400)
    except ClientError as exc:
        logger.debug("webhook refused: %s: %s", exc.code, exc)
        runtime.metrics.client_errors.labels(exc.code).inc()
        return error_response(exc.status, exc.code, str(exc))
    except Unavailable as exc:
        logger.debug("webhook refused: %s", exc)
        return error_response(
            503, "unavailable", str(exc), headers={"Retry-After": "1"}
        )


async def _accept(
    runtime: Runtime, receiver: WebhookReceiver, fixture_event: FixtureEvent
) -> Response:
    # The id is checked and remembered in the same step that stores the events,
    # so a repeat is refused on any replica, and a retry after an answer lost
    # to a Redis outage finds the id taken rather than publishing twice.
    once = Once(f"webhooks:fixtures:{fixture_event.id}", "", receiver.remember)
    try:
        events = await runtime.publish(fixture_event.drafts(), once=once)
    except AlreadyPublished:
        logger.debug("webhook %s repeated; not published again", fixture_event.id)
        return JSONResponse({"eventId": fixture_event.id, "duplicate": True})
    logger.debug(
        "webhook %s published as %s on %s",
        fixture_event.id,
        fixture_event.type,
        fixture_event.topic,
    )
    return JSONResponse(
        {
            "eventId": fixture_event.id,
            "duplicate": False,
            "events": [
                {"id": event.id, "topic": event.topic, "offset": event.offset}
                for event in events
            ],
        }
    )


routes = [Route("/webhooks/fixtures", fixtures_webhook, methods=["POST"])]
