"""Subscriber tokens: JWTs signed with a shared secret or a private key.

A token names its holder (``sub``), ends (``exp``) and lists the topic filters the
holder may read (``topics``, an array of filters or one comma-separated string).
HS256 tokens are checked with ``--jwt-secret``; RS256 and ES256 tokens with the
public keys of ``--jwt-public-keys`` (a PEM file that may hold several keys, so
that a new signing key can be added before the old one is retired).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import BadTopic, Unauthorized
from gateway.events.topics import validate_filter
from gateway.security.permissions import ReadRights

__all__ = ["Grant", "TokenVerifier"]

logger = logging.getLogger(__name__)

_PEM_BLOCK = re.compile(
    rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL
)
#: The kind of public key each asymmetric algorithm is checked with.
_KEY_TYPES: dict[str, type] = {"RS256": RSAPublicKey, "ES256": EllipticCurvePublicKey}
#: Seconds of clock difference allowed between the token's issuer and the gateway.
_LEEWAY = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows, and until when."""

    subject: str
    rights: ReadRights
    expires_at: float

    def seconds_left(self) -> float:
        """Seconds until the token expires (negative once it has)."""
        return self.expires_at - time.time()


class TokenVerifier:
    """Checks tokens against the configured secret and public keys."""

    def __init__(self, secret: str | None, public_keys_file: str | None) -> None:
        """Load what tokens are checked with.

        Raises:
            ValueError: the key file cannot be read, holds no PEM public key,
                or one that is neither RSA nor EC.
        """
        self._secret = secret
        self._public_keys: list[Any] = []
        if public_keys_file:
            try:
                data = Path(public_keys_file).read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"cannot read {public_keys_file}: {exc.strerror}"
                ) from None
            blocks = _PEM_BLOCK.findall(data)
            if not blocks:
                raise ValueError(f"no PEM public key in {public_keys_file}")
            self._public_keys = [load_pem_public_key(block) for block in blocks]

    @property
    def enabled(self) -> bool:
        """Whether any token can be checked at all."""
        return bool(self._secret or self._public_keys)

    def verify(self, token: str) -> Grant:
        """Check a token's signature, expiry and claims.

        Raises:
            Unauthorized: the token is malformed, signed by no known key,
                expired, or lacks ``sub``, ``exp`` or ``topics``.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed token: {exc}") from exc
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            # Any JSON value can stand here; only a name can be looked up.
            raise Unauthorized("the token's header has no algorithm name ('alg')")
        if algorithm == "HS256" and self._secret:
            keys: list[Any] = [self._secret]
        elif algorithm in _KEY_TYPES and (
            keys := [
                k for k in self._public_keys if isinstance(k, _KEY_TYPES[algorithm])
            ]
        ):
            pass
        else:
            raise Unauthorized(f"tokens signed with {algorithm!r} are not accepted")
        claims = self._decode(token, algorithm, keys)
        topics = claims.get("topics")
        if isinstance(topics, str):
            topics = topics.split(",")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise Unauthorized("the token's 'topics' must list topic filters")
        for topic_filter in (t.strip() for t in topics):
            try:
                validate_filter(topic_filter)
            except BadTopic as exc:
                # A right that breaks the grammar would never match; the issuer
                # made a mistake that it should hear of rather than have ignored.
                raise Unauthorized(f"the token's 'topics': {exc}") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("the token has no 'sub'")
        return Grant(subject, ReadRights.parse(topics), float(claims["exp"]))

    @staticmethod
    def _decode(token: str, algorithm: str, keys: list[Any]) -> dict[str, Any]:
        error: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    options={"require": ["exp", "sub"]},
                    leeway=_LEEWAY,
                )
                return claims
            except jwt.ExpiredSignatureError as exc:
                raise Unauthorized("the token has expired") from exc
            except jwt.InvalidSignatureError as exc:
                error = exc
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"invalid token: {exc}") from exc
        raise Unauthorized(f"invalid token: {error}")
