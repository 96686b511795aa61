"""The local routing table of one replica.

The router maps topic filters to the connections of this replica that hold them. For
each event it finds the connections whose filters match the topic, once each however
many of their filters match, and hands them the event. Delivery itself is the
subscriber's business: writing the shared frame bytes to its socket.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from gateway.events.envelope import Event
from gateway.events.topics import filter_matches, is_wildcard

__all__ = ["Router", "Subscriber"]


class Subscriber(Protocol):
    """What the router needs of a connection."""

    def deliver(self, event: Event) -> None:
        """Send one event; must not block, raise, or change the router."""


class Router:
    """Topic filters to local subscribers, with exact names on a fast path."""

    def __init__(self) -> None:
        # Exact topic names and wildcard filters are kept apart: most subscriptions
        # name a topic, and those cost one dictionary lookup per event.
        self._exact: dict[str, set[Subscriber]] = {}
        self._wildcard: dict[str, set[Subscriber]] = {}
        # Topic name to the wildcard filters that match it, rebuilt lazily whenever
        # the set of wildcard filters changes.
        self._matches: dict[str, tuple[str, ...]] = {}

    @property
    def subscription_count(self) -> int:
        """Subscriptions held on this replica: one per connection and filter."""
        return sum(map(len, self._exact.values())) + sum(
            map(len, self._wildcard.values())
        )

    def add(self, subscriber: Subscriber, topic_filter: str) -> bool:
        """Route events matching ``topic_filter`` to ``subscriber``.

        Returns:
            True if this is the first local subscriber of that filter.
        """
        table = self._wildcard if is_wildcard(topic_filter) else self._exact
        holders = table.get(topic_filter)
        if holders is None:
            holders = table[topic_filter] = set()
            if table is self._wildcard:
                self._matches.clear()
        holders.add(subscriber)
        return len(holders) == 1

    def remove(self, subscriber: Subscriber, topic_filter: str) -> bool:
        """Stop routing ``topic_filter`` to ``subscriber``.

        Returns:
            True if the filter has no local subscriber left.
        """
        table = self._wildcard if is_wildcard(topic_filter) else self._exact
        holders = table.get(topic_filter)
        if holders is None or subscriber not in holders:
            return False
        holders.discard(subscriber)
        if holders:
            return False
        del table[topic_filter]
        if table is self._wildcard:
            self._matches.clear()
        return True

    def remove_all(
        self, subscriber: Subscriber, topic_filters: Iterable[str]
    ) -> list[str]:
        """Drop several filters of one subscriber; return those left with nobody."""
        return [f for f in topic_filters if self.remove(subscriber, f)]

    def _wildcards_matching(self, topic: str) -> tuple[str, ...]:
        found = self._matches.get(topic)
        if found is None:
            found = tuple(f for f in self._wildcard if filter_matches(f, topic))
            # The cache is bounded by the number of distinct topics published while
            # the wildcard set stays the same; clear it if that grows too far.
            if len(self._matches) > 100_000:
                self._matches.clear()
            self._matches[topic] = found
        return found

    def deliver(self, event: Event) -> int:
        """Hand ``event`` to every matching subscriber once.

        Returns:
            How many subscribers it was handed to.
        """
        exact = self._exact.get(event.topic)
        wildcards = self._wildcards_matching(event.topic) if self._wildcard else ()
        if not wildcards:
            if not exact:
                return 0
            # A copy, because a subscriber that turns out to be too slow leaves
            # the table while the loop runs.
            targets: tuple[Subscriber, ...] = tuple(exact)
        else:
            union: set[Subscriber] = set(exact) if exact else set()
            for topic_filter in wildcards:
                union.update(self._wildcard[topic_filter])
            targets = tuple(union)
        for subscriber in targets:
            subscriber.deliver(event)
        return len(targets)
