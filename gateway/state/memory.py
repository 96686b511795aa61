"""The in-memory backend: one process, no outside service, the embedded default."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from gateway.events.envelope import Draft, Event, stamp
from gateway.state.base import (
    AlreadyPublished,
    ConnectionRecord,
    EventRef,
    HistoryRead,
    Once,
    StateBackend,
    TopicStats,
)

__all__ = ["MemoryBackend"]

logger = logging.getLogger(__name__)


class MemoryBackend(StateBackend):
    """Keeps everything in dictionaries of this process.

    Publishing is synchronous under the hood: an event is stored and handed to the
    listener before ``publish`` returns, so a reader of the history never misses
    what a live subscriber saw, nor the reverse.
    """

    name = "memory"

    def __init__(
        self,
        *,
        history_size: int = 1000,
        max_once_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty backend.

        Args:
            history_size: events kept per topic; older ones are forgotten.
            max_once_keys: ``Once`` keys remembered at most; past this the
                oldest is forgotten before its time.
            clock: the monotonic clock ``Once`` keys expire by, in seconds.
        """
        super().__init__()
        self._history_size = history_size
        # Once keys, oldest first: key to (expiry time, fingerprint, events).
        self._once: OrderedDict[str, tuple[float, str, list[EventRef]]] = OrderedDict()
        self._max_once_keys = max_once_keys
        self._clock = clock
        # Per topic: the newest events (capped) and the newest offset ever given.
        self._history: dict[str, deque[Event]] = {}
        self._last_offset: dict[str, int] = {}
        # Per topic given an end by ``expire_topic``: the timer that forgets it.
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        # Registry: open connections, and subscriptions both ways.
        self._connections: dict[str, ConnectionRecord] = {}
        self._filters_of: dict[str, set[str]] = {}
        self._subscribers_of: Counter[str] = Counter()

    async def publish(
        self, drafts: Sequence[Draft], *, max_bytes: int, once: Once | None = None
    ) -> list[Event]:
        if once is not None:
            self._check_once(once.key)
        # Stamp the whole batch before storing any of it, so that an event over
        # the size limit leaves no offset used and nothing half published.
        next_offset = dict(self._last_offset)
        events = []
        for draft in drafts:
            offset = next_offset.get(draft.topic, 0) + 1
            next_offset[draft.topic] = offset
            events.append(stamp(draft, offset, max_bytes=max_bytes))
        listener = self._listener
        for event in events:
            history = self._history.get(event.topic)
            if history is None:
                history = self._history[event.topic] = deque(maxlen=self._history_size)
            history.append(event)
            self._last_offset[event.topic] = event.offset
            if listener is not None:
                listener(event)
        if once is not None:
            refs = [EventRef(e.id, e.topic, e.offset) for e in events]
            self._once[once.key] = (self._clock() + once.ttl, once.fingerprint, refs)
            if len(self._once) > self._max_once_keys:
                self._once.popitem(last=False)
        return events

    def _check_once(self, key: str) -> None:
        """Raise AlreadyPublished if ``key`` is remembered; forget expired keys."""
        now = self._clock()
        # Keys are kept in the order they were stored, so with one time to live
        # the expired ones are at the front. A longer-lived key there only delays
        # forgetting those behind it: they are checked here, and bounded.
        while self._once:
            oldest = next(iter(self._once.values()))
            if oldest[0] > now:
                break
            self._once.popitem(last=False)
        found = self._once.get(key)
        if found is not None and found[0] > now:
            raise AlreadyPublished(found[2], found[1])

    async def read_history(self, topic: str, after: int, limit: int) -> HistoryRead:
        history = self._history.get(topic)
        last = self._last_offset.get(topic, 0)
        if not history:
            return HistoryRead((), 0, last)
        first = history[0].offset
        # Offsets in one history are contiguous, so the start is computed, not searched.
        start = max(0, after - first + 1)
        events = [history[i] for i in range(start, min(len(history), start + limit))]
        return HistoryRead(events, first, last)

    async def expire_topic(self, topic: str, seconds: float) -> None:
        earlier = self._expiries.pop(topic, None)
        if earlier is not None:
            earlier.cancel()
        loop = asyncio.get_running_loop()
        self._expiries[topic] = loop.call_later(
            max(0.0, seconds), self._forget_topic, topic
        )

    def _forget_topic(self, topic: str) -> None:
        self._expiries.pop(topic, None)
        self._history.pop(topic, None)
        self._last_offset.pop(topic, None)
        logger.debug("topic %s expired", topic)

    async def close(self) -> None:
        for timer in self._expiries.values():
            timer.cancel()
        self._expiries.clear()

    async def watch(self, topic_filter: str) -> None:
        # One process: every published event already reaches the listener.
        return None

    async def unwatch(self, topic_filter: str) -> None:
        return None

    async def add_connection(self, record: ConnectionRecord) -> None:
        self._connections[record.id] = record
        self._filters_of.setdefault(record.id, set())

    async def remove_connection(self, connection_id: str) -> None:
        self._connections.pop(connection_id, None)
        filters = self._filters_of.pop(connection_id, set())
        self._subscribers_of.subtract(filters)
        self._drop_zero_counts(filters)

    async def add_subscriptions(
        self, connection_id: str, topic_filters: Iterable[str]
    ) -> None:
        held = self._filters_of.get(connection_id)
        if held is None:
            return
        new = set(topic_filters) - held
        held |= new
        self._subscribers_of.update(new)

    async def remove_subscriptions(
        self, connection_id: str, topic_filters: Iterable[str]
    ) -> None:
        held = self._filters_of.get(connection_id)
        if held is None:
            return
        gone = held & set(topic_filters)
        held -= gone
        self._subscribers_of.subtract(gone)
        self._drop_zero_counts(gone)

    def _drop_zero_counts(self, filters: Iterable[str]) -> None:
        for name in filters:
            if self._subscribers_of[name] <= 0:
                del self._subscribers_of[name]

    async def connection_count(self) -> int:
        return len(self._connections)

    async def topic_stats(self) -> list[TopicStats]:
        names = set(self._subscribers_of) | set(self._last_offset)
        return [
            TopicStats(
                name,
                subscribers=self._subscribers_of.get(name, 0),
                last_offset=self._last_offset.get(name, 0),
            )
            for name in sorted(names)
        ]
