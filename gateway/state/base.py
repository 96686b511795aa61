"""The contract every state backend fulfils.

A backend keeps the connection registry, the subscriptions, and a capped history per
topic whose positions are the offsets. It also carries events between replicas: an
event published through any replica reaches the listener of every replica that
watches a filter matching its topic. The in-memory backend serves one process; the
Redis backend serves many replicas.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.events.envelope import Draft, Event

__all__ = [
    "ConnectionRecord",
    "EventListener",
    "HistoryRead",
    "StateBackend",
    "TopicStats",
]

EventListener = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """What the registry knows of one open connection."""

    id: str
    replica: str
    transport: str
    user: str | None
    connected_at: float


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """Events read from one topic's history.

    Attributes:
        events: the events after the requested offset, oldest first.
        first_offset: the oldest offset still kept, or 0 when nothing is kept.
        last_offset: the newest offset ever published on the topic, or 0.
    """

    events: Sequence[Event]
    first_offset: int
    last_offset: int


@dataclass(slots=True)
class TopicStats:
    """Admin view of one topic or topic filter."""

    name: str
    subscribers: int = 0
    last_offset: int = 0


class StateBackend(abc.ABC):
    """Registry, subscriptions, history and cross-replica delivery.

    Methods are coroutines so that the Redis backend can do I/O; callers never run
    two calls for the same connection at once. ``publish`` may run concurrently with
    anything else.
    """

    #: Name shown in logs, ``/readyz`` and metrics.
    name: str = "abstract"

    def __init__(self) -> None:
        self._listener: EventListener | None = None

    def set_listener(self, listener: EventListener) -> None:
        """Name the callable that receives every event this replica must deliver.

        The backend calls it from the event loop, once per event, in offset order
        per topic. It must not block or raise.
        """
        self._listener = listener

    async def start(self) -> None:
        """Connect to whatever the backend needs; raise ``Unavailable`` if it can't."""
        return None

    async def close(self) -> None:
        """Release connections and, for this replica, every record it wrote."""
        return None

    def is_ready(self) -> bool:
        """Tell whether publishing would succeed right now."""
        return True

    @abc.abstractmethod
    async def publish(self, drafts: Sequence[Draft], *, max_bytes: int) -> list[Event]:
        """Stamp, store and deliver a batch of events, all or none.

        Args:
            drafts: validated envelopes, in the order they must get offsets.
            max_bytes: largest accepted encoded event, in bytes.

        Returns:
            The stamped events, in the order of ``drafts``.

        Raises:
            TooLarge: an event is over ``max_bytes``; nothing was stored.
            Unavailable: the backend can't store events now; nothing was stored.
        """

    @abc.abstractmethod
    async def read_history(self, topic: str, after: int, limit: int) -> HistoryRead:
        """Read up to ``limit`` events of ``topic`` with offsets above ``after``."""

    @abc.abstractmethod
    async def watch(self, topic_filter: str) -> None:
        """Start passing events that match ``topic_filter`` to this replica's listener.

        Calls are counted: a filter watched twice needs two ``unwatch`` calls.
        """

    @abc.abstractmethod
    async def unwatch(self, topic_filter: str) -> None:
        """Undo one ``watch`` of ``topic_filter``."""

    @abc.abstractmethod
    async def add_connection(self, record: ConnectionRecord) -> None:
        """Register an open connection."""

    @abc.abstractmethod
    async def remove_connection(self, connection_id: str) -> None:
        """Forget a connection and every subscription it held."""

    @abc.abstractmethod
    async def add_subscriptions(
        self, connection_id: str, topic_filters: Iterable[str]
    ) -> None:
        """Record that a connection subscribed to these filters."""

    @abc.abstractmethod
    async def remove_subscriptions(
        self, connection_id: str, topic_filters: Iterable[str]
    ) -> None:
        """Record that a connection dropped these filters."""

    @abc.abstractmethod
    async def connection_count(self) -> int:
        """Count open connections across all replicas."""

    @abc.abstractmethod
    async def topic_stats(self) -> list[TopicStats]:
        """Per topic or filter: subscribers across all replicas and last offset."""
