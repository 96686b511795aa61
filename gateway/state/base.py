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
    "AlreadyPublished",
    "ConnectionRecord",
    "EventListener",
    "EventRef",
    "HistoryRead",
    "Once",
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


@dataclass(frozen=True, slots=True)
class Once:
    """Makes a publish happen at most once for its key.

    Attributes:
        key: unique among the publishes that must not repeat (the caller puts
            whose key it is in it, such as ``publish:<key name>:<client key>``).
        fingerprint: what the first request held, such as a hash of its body;
            a repeat may be checked against it.
        ttl: seconds the key is remembered after the first publish.
    """

    key: str
    fingerprint: str
    ttl: float


@dataclass(frozen=True, slots=True)
class EventRef:
    """Where a published event went: its id, topic and offset."""

    id: str
    topic: str
    offset: int


class AlreadyPublished(Exception):
    """A publish whose ``Once`` key was used before; nothing new was stored.

    Attributes:
        events: the events the first publish stored.
        fingerprint: the first publish's fingerprint.
    """

    def __init__(self, events: Sequence[EventRef], fingerprint: str) -> None:
        super().__init__(f"already published as {len(events)} events")
        self.events = tuple(events)
        self.fingerprint = fingerprint


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
    async def publish(
        self, drafts: Sequence[Draft], *, max_bytes: int, once: Once | None = None
    ) -> list[Event]:
        """Stamp, store and deliver a batch of events, all or none.

        With ``once``, the check of its key, the events and the key itself are
        stored in one step: of two publishes with one key, on any replicas, one
        stores its events and the other raises ``AlreadyPublished``; and a
        publish that stored its events has stored its key, even if its answer
        was lost on the way back (Redis frozen), so a retry never stores twice.

        Args:
            drafts: validated envelopes, in the order they must get offsets.
            max_bytes: largest accepted encoded event, in bytes.
            once: makes the publish happen at most once for this key.

        Returns:
            The stamped events, in the order of ``drafts``.

        Raises:
            TooLarge: an event is over ``max_bytes``; nothing was stored.
            AlreadyPublished: ``once`` names a key used before; nothing stored.
            Unavailable: the backend can't store events now. Nothing was stored,
                unless the backend stopped answering while it stored them; with
                ``once``, a retry then tells which.
        """

    @abc.abstractmethod
    async def read_history(self, topic: str, after: int, limit: int) -> HistoryRead:
        """Read up to ``limit`` events of ``topic`` with offsets above ``after``."""

    @abc.abstractmethod
    async def expire_topic(self, topic: str, seconds: float) -> None:
        """Forget ``topic``'s history and last offset ``seconds`` from now.

        For topics with an end, such as a job's: once forgotten, the topic reads
        as one never published on (no events, last offset 0). Events published
        on it meanwhile do not postpone the expiry; calling this again resets it.

        Raises:
            Unavailable: the backend cannot be reached; nothing was changed.
        """

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
