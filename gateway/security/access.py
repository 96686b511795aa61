"""Who may open a WebSocket connection and read which topics."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from gateway.config import Settings
from gateway.errors import Unauthorized
from gateway.security.permissions import ReadRights
from gateway.security.tokens import Grant, TokenVerifier

__all__ = ["SubscriberAccess"]

#: The query parameter that carries a token where a header cannot (browsers).
TOKEN_PARAMETER = "access_token"


class SubscriberAccess:
    """The gateway's rules for subscribers: tokens, and rights without one."""

    def __init__(self, verifier: TokenVerifier, anonymous: ReadRights | None) -> None:
        """Check tokens with ``verifier``; ``anonymous`` None refuses clients
        that bring no token."""
        self.verifier = verifier
        self.anonymous = anonymous

    @classmethod
    def from_settings(cls, settings: Settings) -> SubscriberAccess:
        """The rules the settings describe.

        Raises:
            ValueError: the public key file cannot be read as PEM keys.
        """
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        verifier = TokenVerifier(secret, settings.jwt_public_keys)
        anonymous = None
        if settings.anonymous_read.strip():
            anonymous = ReadRights.parse(settings.anonymous_read)
        return cls(verifier, anonymous)

    def token_of(self, path: str, authorization: str | None) -> str | None:
        """The token of an upgrade request: a bearer header, else the query."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        values = parse_qs(urlsplit(path).query).get(TOKEN_PARAMETER)
        return values[0] if values else None

    def admit(self, token: str | None) -> Grant | None:
        """The grant of a new connection; None for an anonymous one.

        Raises:
            Unauthorized: a bad or expired token, or none where one is needed.
        """
        if token is not None:
            if not self.verifier.enabled:
                raise Unauthorized("this gateway accepts no tokens")
            return self.verifier.verify(token)
        if self.anonymous is None:
            raise Unauthorized("a token is needed to connect")
        return None

    def rights(self, grant: Grant | None) -> ReadRights:
        """What a connection with ``grant`` (or none) may read."""
        if grant is not None:
            return grant.rights
        assert self.anonymous is not None
        return self.anonymous
