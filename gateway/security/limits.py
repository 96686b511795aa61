"""Limits on who may open WebSocket connections, and how many, how fast.

Checked at the upgrade, before a connection costs anything: the ``Origin`` of a
browser's request against an allow-list (a page of another site must not open
sockets with the visitor's cookies: cross-site WebSocket hijacking), open
connections per process and per client address, and new connections per second
per address.

The address is the TCP peer's. Behind a load balancer that is the balancer's
address, so there the per-address limits apply to all clients together; set them
high there, or enforce them at the balancer.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from gateway.config import Settings

__all__ = ["ConnectionLimits", "Refusal"]

#: Addresses whose connect-rate buckets are kept before the full ones are dropped.
_MAX_TRACKED = 10_000


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an upgrade is refused: HTTP status, error code, message."""

    status: int
    code: str
    message: str


class ConnectionLimits:
    """Counts open connections and recent connects; says which to refuse."""

    def __init__(
        self,
        *,
        allowed_origins: frozenset[str] | None,
        max_connections: int,
        max_per_address: int,
        connects_per_second: float,
    ) -> None:
        """Set the limits; ``allowed_origins`` None lets any origin in, and a
        per-address limit or rate of 0 is no limit."""
        self.allowed_origins = allowed_origins
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.rate = connects_per_second
        self.open = 0
        self._per_address: Counter[str] = Counter()
        # Address to (tokens, time of last refill): a bucket of twice the rate.
        self._buckets: dict[str, tuple[float, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The limits the settings describe."""
        origins = [o.strip().rstrip("/") for o in settings.allowed_origins.split(",")]
        allowed = frozenset(o for o in origins if o)
        return cls(
            allowed_origins=None if not allowed or "*" in allowed else allowed,
            max_connections=settings.max_connections,
            max_per_address=settings.max_connections_per_address,
            connects_per_second=settings.max_connects_per_second,
        )

    def check(self, address: str, origin: str | None) -> Refusal | None:
        """Whether a new connection from ``address`` may open; counts it if so.

        A connection that was let in must be given back with ``release``.
        """
        if origin is not None and self.allowed_origins is not None:
            if origin.rstrip("/") not in self.allowed_origins:
                return Refusal(
                    403, "origin_not_allowed", f"origin {origin!r} is not allowed"
                )
        if self.rate and not self._take_token(address):
            return Refusal(
                429, "too_many_connects", "too many new connections from your address"
            )
        if self.open >= self.max_connections:
            return Refusal(
                503, "too_many_connections", "this replica is full; try another"
            )
        if self.max_per_address and self._per_address[address] >= self.max_per_address:
            return Refusal(
                429,
                "too_many_connections",
                f"at most {self.max_per_address} connections per address",
            )
        self.open += 1
        self._per_address[address] += 1
        return None

    def release(self, address: str) -> None:
        """Give back a connection that ``check`` let in."""
        self.open -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def _take_token(self, address: str) -> bool:
        now = time.monotonic()
        capacity = 2 * self.rate
        tokens, last = self._buckets.get(address, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            return False
        self._buckets[address] = (tokens - 1, now)
        if len(self._buckets) > _MAX_TRACKED:
            self._forget_idle(now)
        return True

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled: they hold no information."""
        capacity = 2 * self.rate
        self._buckets = {
            address: (tokens, last)
            for address, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate < capacity
        }
