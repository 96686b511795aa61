"""The gateway's exceptions.

    GatewayError
    ├── ClientError            the client sent something wrong; it can fix it
    │   ├── BadRequest         malformed JSON, unknown op, wrong field type
    │   ├── BadTopic           a topic name or filter breaks the grammar
    │   ├── TooLarge           a body, event or frame over its limit
    │   ├── Unauthorized       missing or wrong credentials
    │   ├── Forbidden          credentials that do not allow this
    │   └── LimitExceeded      too many subscriptions, messages too fast
    ├── Unavailable            a dependency (Redis, the broker) cannot be reached
    └── InternalError          the gateway itself failed

Each client error carries a short ``code`` that also appears in JSON error bodies
and WebSocket error frames, so clients can branch on it.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "BadTopic",
    "ClientError",
    "Forbidden",
    "GatewayError",
    "InternalError",
    "LimitExceeded",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]


class GatewayError(Exception):
    """Base class of every exception the gateway raises on purpose."""


class ClientError(GatewayError):
    """The client sent something wrong."""

    code = "bad_request"
    status = 400


class BadRequest(ClientError):
    """Malformed JSON, an unknown op or a field of the wrong type."""

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class BadTopic(ClientError):
    """A topic name or topic filter breaks the grammar."""

    code = "bad_topic"


class TooLarge(ClientError):
    """A request body, event or frame is over its configured limit."""

    code = "too_large"
    status = 413


class Unauthorized(ClientError):
    """Missing or wrong credentials."""

    code = "unauthorized"
    status = 401


class Forbidden(ClientError):
    """Valid credentials, or none, that do not allow what was asked."""

    code = "forbidden"
    status = 403


class LimitExceeded(ClientError):
    """A per-connection limit was reached."""

    code = "limit_exceeded"
    status = 429


class Unavailable(GatewayError):
    """A dependency of the gateway cannot be reached right now."""


class InternalError(GatewayError):
    """The gateway itself failed."""
