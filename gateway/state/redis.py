"""The Redis backend: many replicas sharing registry, history and fan-out.

Keys, with the configured prefix ``P`` (``gateway:`` by default); the braces are Redis
Cluster hash tags, so every key of one topic lives in one slot:

- ``P{topic}:seq``      the topic's last offset (a counter);
- ``P{topic}:history``  a capped stream whose entry ids are ``0-<offset>``;
  both expire once ``expire_topic`` gives the topic an end (a job's, once it is
  finished), and never otherwise;
- ``P{topic}:events``   the pub/sub channel of the topic's events;
- ``Pconn:<id>``        a hash per connection (replica, transport, user, connected
  at), expiring unless its replica refreshes it;
- ``Pconn:<id>:filters`` the connection's topic filters, expiring likewise;
- ``Pconnections``      sorted set of connection ids scored by expiry time;
- ``Psubs:<filter>``    sorted set of the connection ids holding a filter, scored by
  expiry time, so a crashed replica's members stop counting once they expire;
- ``Pgeneration``       a random value written once: it changes only when Redis
  lost its data, which is how a replica tells that apart from topics that expired.

Publishing runs one script that takes the next offset, appends to the history and
publishes on the channel, atomically: no subscriber can see an event live and miss it
on resume, or the reverse. Each replica subscribes only to the channels (exact
filters) and patterns (wildcard filters) that its own clients need.

If Redis loses its data (a restart without persistence), offsets must not start over
under clients that remember later ones: each replica remembers the last offset it saw
per topic and passes it to the script as a floor, and writes it back when Redis
returns having lost its data (``Pgeneration`` changed); a topic that only expired
is not written back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.config import without_credentials
from gateway.errors import Unavailable
from gateway.events.envelope import Draft, Event, decode_event, encode
from gateway.events.topics import filter_matches, is_wildcard
from gateway.state.base import (
    AlreadyPublished,
    ConnectionRecord,
    EventRef,
    HistoryRead,
    Once,
    StateBackend,
    TopicStats,
)

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

#: Connections to Redis per replica, the pub/sub one included.
_POOL_SIZE = 32
#: Connection records deleted per pipeline.
_REMOVAL_BATCH = 500
#: Connection records written per pipeline on a refresh.
_WRITE_CHUNK = 200

# KEYS: seq and history key of each event, in order, then the Once key if any.
# ARGV: the history cap, whether to publish on sharded channels too, the Once
# fingerprint (empty for none) and time to live in ms, then per event the offset
# floor, the channel, the payload around its offset, its id and its topic. Exact
# subscriptions listen on the sharded channel where Redis has them; patterns
# (wildcard subscriptions) only see PUBLISH. Answers {1, offsets} or, for a Once key
# seen before, {0, what its first publish stored}.
_PUBLISH = """
local cap = ARGV[1]
local sharded = ARGV[2] == '1'
local once = ARGV[3] ~= ''
local count = #KEYS / 2
if once then
  count = (#KEYS - 1) / 2
  local prior = redis.call('GET', KEYS[#KEYS])
  if prior then return {0, prior} end
end
local offsets = {}
local stored = {}
for i = 1, count do
  local arg = 5 + (i - 1) * 6
  local offset = redis.call('INCR', KEYS[2 * i - 1])
  local floor = tonumber(ARGV[arg])
  if offset <= floor then
    offset = floor + 1
    redis.call('SET', KEYS[2 * i - 1], offset, 'KEEPTTL')
  end
  local payload = ARGV[arg + 2] .. offset .. ARGV[arg + 3]
  redis.call('XADD', KEYS[2 * i], 'MAXLEN', '~', cap, '0-' .. offset, 'e', payload)
  if sharded then
    redis.call('SPUBLISH', ARGV[arg + 1], payload)
  end
  redis.call('PUBLISH', ARGV[arg + 1], payload)
  offsets[i] = offset
  stored[i] = {ARGV[arg + 4], ARGV[arg + 5], offset}
end
if once then
  local record = cjson.encode({f = ARGV[3], e = stored})
  redis.call('SET', KEYS[#KEYS], record, 'PX', ARGV[4])
end
return {1, offsets}
"""

# KEYS[1]: a topic's seq key. ARGV[1]: an offset the topic is known to have reached.
_RAISE_FLOOR = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
end
return current
"""


def _glob(topic_filter: str) -> str:
    """A Redis glob matching at least the topics a wildcard filter matches.

    Redis globs have no one-level wildcard, so ``+`` becomes ``*`` too; the router
    drops what the glob lets through but the filter does not match. Topic names
    hold no glob metacharacter, so nothing needs escaping.
    """
    levels = topic_filter.split("/")
    if levels[-1] == "#":
        # '#' also matches the parent level itself: 'a/#' matches 'a'.
        prefix = "/".join("*" if level == "+" else level for level in levels[:-1])
        return f"{prefix}*" if prefix else "*"
    return "/".join("*" if level == "+" else level for level in levels)


class RedisBackend(StateBackend):
    """State in one Redis server, shared by every replica that names it."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        replica: str,
        prefix: str = "gateway:",
        history_size: int = 1000,
        record_ttl: float = 30.0,
        retry_interval: float = 0.5,
    ) -> None:
        """Create a backend; nothing connects before ``start``.

        Args:
            url: a ``redis://`` or ``rediss://`` URL.
            replica: this replica's name, written in its connection records.
            prefix: put before every key and channel name.
            history_size: events kept per topic (approximately, at least this).
            record_ttl: seconds a connection record lives unless refreshed; the
                replica refreshes every third of it.
            retry_interval: seconds between attempts while Redis is unreachable.
        """
        super().__init__()
        self._url = url
        self._replica = replica
        self._prefix = prefix
        self._history_size = history_size
        self._record_ttl = record_ttl
        self._retry_interval = retry_interval
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._publish_script: Any = None
        self._floor_script: Any = None
        # Whether the last Redis operation worked; /readyz reports it.
        self._ready = False
        # Whether exact subscriptions use sharded channels (SSUBSCRIBE).
        self._sharded = False
        # Set when a subscribe failed; the listener then reconnects and
        # subscribes to everything again.
        self._resubscribe = False
        # This replica's connections and their filters: written to Redis on every
        # refresh, so they come back after Redis lost its data.
        self._records: dict[str, ConnectionRecord] = {}
        self._filters: dict[str, set[str]] = {}
        # Filter to the number of local watchers; a filter is subscribed in Redis
        # while its count is above zero.
        self._watches: dict[str, int] = {}
        # Channel or pattern name to the number of watched filters that need it.
        self._channel_refs: dict[str, int] = {}
        # Channel or pattern to the future resolved when Redis confirms it.
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        # Per topic, the last offset passed to the listener: drops duplicates (an
        # event that arrives through a channel and a pattern, or again during a
        # catch-up). Both maps grow with the number of topics this replica meets.
        self._delivered: dict[str, int] = {}
        # Per topic, the highest offset this replica published or saw: the floor
        # for new offsets if Redis lost its counters.
        self._floor: dict[str, int] = {}
        # The value of ``Pgeneration`` when this replica last wrote its floors
        # back: while it is unchanged Redis kept its data, and a topic counter
        # that is missing expired on purpose.
        self._generation: bytes | None = None
        # Per topic given an end by ``expire_topic`` here: the timer that drops
        # its floor and delivery mark once Redis has forgotten it.
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        # Topics being caught up from history after a reconnect, with the live
        # events that arrived meanwhile, released in order afterwards.
        self._catching_up: dict[str, list[Event]] = {}
        # Per exact topic, its offset when this replica started watching it: where
        # a catch-up starts if no event of it was delivered since.
        self._watched_from: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        # Connections gone, with their filters, whose records await deletion.
        self._removals: list[tuple[str, Iterable[str]]] = []
        self._removal_task: asyncio.Task[None] | None = None

    # Names

    def _key(self, topic: str, kind: str) -> str:
        return f"{self._prefix}{{{topic}}}:{kind}"

    def _channel(self, topic_filter: str) -> str:
        if is_wildcard(topic_filter):
            return f"{self._prefix}{{{_glob(topic_filter)}}}:events"
        return self._key(topic_filter, "events")

    # Lifecycle

    async def start(self) -> None:
        # No silent retries: a failed command must reach this backend, which
        # answers 503 for publishes and reconnects its listener itself. The pool
        # makes callers wait for a free connection rather than fail, so a burst
        # of disconnects (a thousand clients gone at once) queues its writes.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=_POOL_SIZE,
            timeout=5,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=5,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._floor_script = self._redis.register_script(_RAISE_FLOOR)
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise Unavailable(
                f"redis at {self._safe_url()} unreachable: {exc}"
            ) from exc
        self._ready = True
        self._generation = await self._read_generation()
        # Sharded pub/sub (Redis 7 and later) lets a Redis Cluster route each
        # topic's events to the one shard that holds its keys.
        version = (await self._redis.info("server")).get("redis_version", "0")
        self._sharded = int(str(version).split(".")[0]) >= 7
        self._pubsub = self._redis.pubsub()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="redis listen"),
            loop.create_task(self._refresh_loop(), name="redis refresh"),
        ]
        logger.info(
            "connected to redis at %s (%s pub/sub)",
            self._safe_url(),
            "sharded" if self._sharded else "classic",
        )

    async def close(self) -> None:
        for timer in self._expiries.values():
            timer.cancel()
        self._expiries.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._removal_task is not None:
            await self._removal_task
        if self._redis is not None and self._ready:
            gone: list[tuple[str, Iterable[str]]] = [
                (i, self._filters.get(i, set())) for i in self._records
            ]
            try:
                await self._remove_records(self._removals + gone)
            except RedisError as exc:
                logger.warning("could not remove connection records: %s", exc)
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            # The pool was made here, so the client does not close it by itself.
            await self._redis.aclose(close_connection_pool=True)

    def is_ready(self) -> bool:
        # Not ready either while subscriptions wait to be made again.
        return self._ready and not self._resubscribe

    def _safe_url(self) -> str:
        # Never log a password that the URL may carry.
        return without_credentials(self._url)

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("redis backend not started")
        return self._redis

    # Publishing and history

    async def publish(
        self, drafts: Sequence[Draft], *, max_bytes: int, once: Once | None = None
    ) -> list[Event]:
        encoded = [encode(draft, max_bytes=max_bytes) for draft in drafts]
        keys: list[str] = []
        args: list[Any] = [self._history_size, "1" if self._sharded else "0"]
        # A fingerprint is never empty in the script: empty means no Once.
        args += (
            [f"={once.fingerprint}", max(1, int(once.ttl * 1000))] if once else ["", 0]
        )
        for item in encoded:
            keys += [self._key(item.topic, "seq"), self._key(item.topic, "history")]
            args += [
                self._floor.get(item.topic, 0),
                self._key(item.topic, "events"),
                item.head,
                item.tail,
                item.id,
                item.topic,
            ]
        if once is not None:
            keys.append(f"{self._prefix}once:{once.key}")
        try:
            fresh, answer = await self._publish_script(keys=keys, args=args)
        except RedisError as exc:
            self._set_ready(False, exc)
            # A timeout may come after the script ran: say so, the publisher
            # decides whether to retry (with Once, a retry is safe).
            raise Unavailable(
                "redis unavailable; the events were not accepted, or their "
                "answer was lost"
            ) from exc
        self._set_ready(True)
        if not fresh:
            record = orjson.loads(answer)
            refs = [EventRef(str(i), str(t), int(o)) for i, t, o in record["e"]]
            raise AlreadyPublished(refs, str(record["f"])[1:])
        offsets = answer
        events = [
            item.with_offset(int(n)) for item, n in zip(encoded, offsets, strict=True)
        ]
        for event in events:
            self._raise_floor(event.topic, event.offset)
        return events

    def _raise_floor(self, topic: str, offset: int) -> None:
        if offset > self._floor.get(topic, 0):
            self._floor[topic] = offset

    async def read_history(self, topic: str, after: int, limit: int) -> HistoryRead:
        client = self._client()
        history = self._key(topic, "history")
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xrange(history, min=f"(0-{after}", max="+", count=limit)
                pipe.xrange(history, min="-", max="+", count=1)
                pipe.get(self._key(topic, "seq"))
                entries, first, last = await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis unavailable; history not read") from exc
        events = [decode_event(fields[b"e"]) for _, fields in entries]
        first_offset = _offset_of(first[0][0]) if first else 0
        return HistoryRead(events, first_offset, int(last or 0))

    async def expire_topic(self, topic: str, seconds: float) -> None:
        ms = max(1, int(seconds * 1000))
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.pexpire(self._key(topic, "seq"), ms)
                pipe.pexpire(self._key(topic, "history"), ms)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable(f"redis unavailable; {topic!r} not expired") from exc
        earlier = self._expiries.pop(topic, None)
        if earlier is not None:
            earlier.cancel()
        loop = asyncio.get_running_loop()
        self._expiries[topic] = loop.call_later(seconds, self._forget_topic, topic)

    def _forget_topic(self, topic: str) -> None:
        # Redis has forgotten the topic: so does this replica, or its floor
        # would keep the offsets of a topic that starts again from 0.
        self._expiries.pop(topic, None)
        self._floor.pop(topic, None)
        if topic not in self._watches:
            self._delivered.pop(topic, None)
            self._watched_from.pop(topic, None)

    # Cross-replica delivery

    async def watch(self, topic_filter: str) -> None:
        count = self._watches.get(topic_filter, 0)
        self._watches[topic_filter] = count + 1
        name = self._channel(topic_filter)
        channel = name.encode()
        if count == 0:
            # Several filters can share one pattern ('+' and '#' both become
            # '*'): Redis subscribes once per channel, counted over filters.
            refs = self._channel_refs.get(name, 0)
            self._channel_refs[name] = refs + 1
            if refs == 0:
                loop = asyncio.get_running_loop()
                self._confirmations[channel] = loop.create_future()
                await self._subscribe(name)
        # Absent once Redis has confirmed: the listener removes it then. While
        # Redis is away there is nothing to wait for: the reconnection
        # subscribes and catches up from history.
        future = self._confirmations.get(channel) if self._ready else None
        if future is not None:
            # Wait for Redis to confirm, so that a history read that follows cannot
            # miss an event published in between. If Redis is away, the reconnect
            # subscribes again and catches up from history instead.
            try:
                await asyncio.wait_for(asyncio.shield(future), 5)
            except TimeoutError:
                logger.warning("no confirmation of %s from redis yet", channel)
                return
        if not is_wildcard(topic_filter) and topic_filter not in self._delivered:
            # Start counting at the topic's present offset, so that a catch-up
            # after an outage replays only what came after this point.
            try:
                last = int(
                    await self._client().get(self._key(topic_filter, "seq")) or 0
                )
            except RedisError as exc:
                logger.debug("reading the offset of %s failed: %s", topic_filter, exc)
                return
            self._watched_from.setdefault(topic_filter, last)
            self._raise_floor(topic_filter, last)

    async def unwatch(self, topic_filter: str) -> None:
        count = self._watches.get(topic_filter, 0) - 1
        if count > 0:
            self._watches[topic_filter] = count
            return
        self._watches.pop(topic_filter, None)
        self._watched_from.pop(topic_filter, None)
        # Forget where delivery stood on topics nothing watches any more: when
        # one is watched again, its events published meanwhile are not owed to
        # anybody, and must not look like a hole to fill from history.
        for topic in [t for t in self._delivered if not self._is_watched(t)]:
            del self._delivered[topic]
        channel = self._channel(topic_filter)
        refs = self._channel_refs.get(channel, 0) - 1
        if refs > 0:
            self._channel_refs[channel] = refs
            return
        self._channel_refs.pop(channel, None)
        try:
            if _is_pattern(channel):
                await self._pubsub.punsubscribe(channel)
            elif self._sharded:
                await self._pubsub.sunsubscribe(channel)
            else:
                await self._pubsub.unsubscribe(channel)
        except RedisError as exc:
            # The listener resubscribes from _channel_refs after a reconnect,
            # and this channel is no longer there.
            logger.debug("unsubscribe of %s failed: %s", channel, exc)

    async def _subscribe(self, channel: str) -> None:
        try:
            if _is_pattern(channel):
                await self._pubsub.psubscribe(channel)
            elif self._sharded:
                await self._pubsub.ssubscribe(channel)
            else:
                await self._pubsub.subscribe(channel)
        except (RedisError, OSError) as exc:
            # The listener goes through its reconnection, which subscribes again
            # to every watched channel once Redis is back.
            logger.debug("subscribe to %s failed: %s", channel, exc)
            self._resubscribe = True
            self._set_ready(False, exc)

    async def _listen(self) -> None:
        """Read pub/sub messages for ever, reconnecting after every failure."""
        while True:
            try:
                await self._read_messages()
            except (RedisError, OSError) as exc:
                self._set_ready(False, exc)
            # Never read the failed connection again: redis-py would resubscribe
            # it behind our back, and what was published meanwhile would be lost.
            while True:
                if await self._reconnect():
                    break
                await asyncio.sleep(self._retry_interval)

    async def _read_messages(self) -> None:
        pubsub = self._pubsub
        while True:
            if self._resubscribe:
                # A subscription failed (Redis was away): start over, which also
                # catches up from history.
                raise RedisConnectionError("a subscription failed; resubscribing")
            if not pubsub.subscribed:
                # redis-py returns at once when nothing is subscribed yet.
                await asyncio.sleep(0.05)
                continue
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("subscribe", "psubscribe", "ssubscribe"):
            # For both kinds redis-py puts the channel or pattern in "channel".
            future = self._confirmations.pop(message["channel"], None)
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind not in ("message", "pmessage", "smessage"):
            return
        try:
            event = decode_event(message["data"])
        except ValueError:
            logger.warning("dropped a malformed message on %s", message["channel"])
            return
        held = self._catching_up.get(event.topic)
        if held is not None:
            held.append(event)
            return
        last = self._delivered.get(event.topic)
        if last is not None and event.offset > last + 1:
            # A hole: pub/sub lost something. Hold this event and fetch the rest.
            self._catching_up[event.topic] = [event]
            self._spawn(self._replay_held([event.topic]))
            return
        self._pass(event)

    def _pass(self, event: Event) -> None:
        """Hand an event to the listener unless it was handed over already."""
        self._raise_floor(event.topic, event.offset)
        if event.offset <= self._delivered.get(event.topic, 0):
            return
        self._delivered[event.topic] = event.offset
        if self._listener is not None:
            self._listener(event)

    def _is_watched(self, topic: str) -> bool:
        return any(filter_matches(f, topic) for f in self._watches)

    def _watched_topics(self) -> list[str]:
        """Exact watched topics, and topics seen that a watched wildcard matches."""
        exact = {f for f in self._watches if not is_wildcard(f)}
        seen = {topic for topic in self._delivered if self._is_watched(topic)}
        return sorted(exact | seen)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _catch_up(self, topics: list[str]) -> None:
        """Deliver from history what pub/sub did not bring for these topics.

        Pub/sub delivers at most once: messages are lost while the listener is
        reconnecting, or if Redis drops a subscriber that fell behind. Live events
        of a topic being caught up are held and released after its history, so
        the listener still gets each event once, in offset order.
        """
        chosen = [topic for topic in topics if topic not in self._catching_up]
        for topic in chosen:
            self._catching_up[topic] = []
        await self._replay_held(chosen)

    async def _replay_held(self, topics: list[str]) -> None:
        """Replay history for topics whose live events are being held."""
        try:
            for topic in topics:
                after = self._delivered.get(topic, self._watched_from.get(topic, 0))
                read = await self.read_history(topic, after, self._history_size)
                logger.debug(
                    "catching up %s after offset %d: %d events",
                    topic,
                    after,
                    len(read.events),
                )
                for event in read.events:
                    self._pass(event)
                if len(read.events) < self._history_size:
                    # Whatever is missing up to the last offset is gone from
                    # history (Redis lost it); waiting for it would stall the topic.
                    self._skip_to(topic, read.last_offset)
                for event in self._catching_up.pop(topic, []):
                    self._pass(event)
        except (RedisError, OSError, Unavailable) as exc:
            # The listener or the next periodic check tries again.
            logger.warning("catching up %d topics failed: %s", len(topics), exc)
        finally:
            for topic in topics:
                for event in self._catching_up.pop(topic, []):
                    self._pass(event)

    def _skip_to(self, topic: str, offset: int) -> None:
        if topic in self._delivered and offset > self._delivered[topic]:
            self._delivered[topic] = offset
        elif topic not in self._delivered and offset > self._watched_from.get(topic, 0):
            self._watched_from[topic] = offset

    async def _check_behind(self) -> None:
        """Catch up exact topics whose last offset in Redis is ahead of delivery."""
        topics = [f for f in self._watches if not is_wildcard(f)]
        if not topics:
            return
        async with self._client().pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.get(self._key(topic, "seq"))
            lasts = await pipe.execute()
        behind = [
            topic
            for topic, last in zip(topics, lasts, strict=True)
            if int(last or 0)
            > self._delivered.get(topic, self._watched_from.get(topic, 0))
        ]
        if behind:
            logger.debug("behind on %d topics; catching up", len(behind))
            await self._catch_up(behind)

    async def _reconnect(self) -> bool:
        """Subscribe again to every watched filter and write the records back.

        Returns:
            Whether Redis answered; the caller retries until it does.
        """
        self._resubscribe = False
        try:
            await self._client().ping()
            old = self._pubsub
            self._pubsub = self._client().pubsub()
            await old.aclose()
            loop = asyncio.get_running_loop()
            pending = []
            for name in list(self._channel_refs):
                future = self._confirmations[name.encode()] = loop.create_future()
                pending.append(future)
                await self._subscribe(name)
            if self._resubscribe:
                # A subscribe failed (it said why): Redis is not back after all.
                return False
            await self._restore_floors()
            await self._write_records()
        except (RedisError, OSError) as exc:
            self._set_ready(False, exc)
            return False
        self._set_ready(True)
        # Catching up needs the listener reading, which starts when this returns.
        self._spawn(self._catch_up_when_confirmed(pending))
        return True

    async def _catch_up_when_confirmed(
        self, pending: list[asyncio.Future[None]]
    ) -> None:
        try:
            if pending:
                await asyncio.wait_for(asyncio.gather(*pending), 5)
        except TimeoutError:
            logger.warning("redis did not confirm every subscription in time")
        await self._catch_up(self._watched_topics())

    async def _read_generation(self) -> bytes | None:
        """The value of ``Pgeneration``, written first if Redis has none."""
        key = f"{self._prefix}generation"
        await self._client().set(key, uuid.uuid4().hex, nx=True)
        value = await self._client().get(key)
        return value.encode() if isinstance(value, str) else value

    async def _restore_floors(self) -> None:
        # After Redis lost its data, the counters start again from what this
        # replica last saw, never below. While Redis kept its data, a missing
        # counter belongs to a topic that expired (a finished job's): writing
        # it back would keep it for ever.
        generation = await self._read_generation()
        if generation == self._generation:
            return
        self._generation = generation
        for topic, offset in list(self._floor.items()):
            await self._floor_script(keys=[self._key(topic, "seq")], args=[offset])

    def _set_ready(self, ready: bool, exc: BaseException | None = None) -> None:
        if ready and not self._ready:
            logger.warning("redis at %s is back", self._safe_url())
        elif not ready and self._ready:
            logger.warning("redis at %s unreachable: %s", self._safe_url(), exc)
        self._ready = ready

    # Registry

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._record_ttl / 3)
            try:
                await self._client().ping()
                await self._write_records()
                await self._check_behind()
            except (RedisError, OSError) as exc:
                self._set_ready(False, exc)
            else:
                self._set_ready(True)

    async def _write_records(self, ids: Iterable[str] | None = None) -> None:
        """Write (or write again) this replica's records with a fresh expiry.

        A replica with thousands of connections writes them in chunks and lets
        the event loop run between two, so that a refresh never holds fan-out up
        for long.
        """
        chosen = list(self._records) if ids is None else list(ids)
        for start in range(0, len(chosen), _WRITE_CHUNK):
            if start:
                await asyncio.sleep(0)
            await self._write_chunk(chosen[start : start + _WRITE_CHUNK])

    async def _write_chunk(self, chosen: Sequence[str]) -> None:
        expiry = time.time() + self._record_ttl
        ttl = int(self._record_ttl) + 1
        members: dict[str, float] = {}
        by_filter: dict[str, dict[str, float]] = {}
        async with self._client().pipeline(transaction=False) as pipe:
            for connection_id in chosen:
                record = self._records.get(connection_id)
                if record is None:
                    continue
                key = f"{self._prefix}conn:{connection_id}"
                pipe.hset(
                    key,
                    mapping={
                        "replica": record.replica,
                        "transport": record.transport,
                        "user": record.user or "",
                        "connected_at": record.connected_at,
                    },
                )
                pipe.expire(key, ttl)
                members[connection_id] = expiry
                filters = self._filters.get(connection_id, set())
                if filters:
                    pipe.sadd(f"{key}:filters", *filters)
                    pipe.expire(f"{key}:filters", ttl)
                for topic_filter in filters:
                    by_filter.setdefault(topic_filter, {})[connection_id] = expiry
            # One command per sorted set for the whole chunk.
            if members:
                pipe.zadd(f"{self._prefix}connections", members)
            for topic_filter, holders in by_filter.items():
                pipe.zadd(f"{self._prefix}subs:{topic_filter}", holders)
            await pipe.execute()

    async def _remove_records(self, gone: Sequence[tuple[str, Iterable[str]]]) -> None:
        """Delete the records of connections, given with the filters they held."""
        if not gone:
            return
        async with self._client().pipeline(transaction=False) as pipe:
            for connection_id, filters in gone:
                key = f"{self._prefix}conn:{connection_id}"
                pipe.delete(key, f"{key}:filters")
                pipe.zrem(f"{self._prefix}connections", connection_id)
                for topic_filter in filters:
                    pipe.zrem(f"{self._prefix}subs:{topic_filter}", connection_id)
            await pipe.execute()

    async def _flush_removals(self) -> None:
        """Delete queued records in large pipelines until the queue is empty."""
        try:
            while self._removals:
                batch = self._removals[:_REMOVAL_BATCH]
                del self._removals[:_REMOVAL_BATCH]
                await self._quietly(self._remove_records(batch))
        finally:
            self._removal_task = None

    async def add_connection(self, record: ConnectionRecord) -> None:
        self._records[record.id] = record
        self._filters[record.id] = set()
        await self._quietly(self._write_records([record.id]))

    async def remove_connection(self, connection_id: str) -> None:
        # Removals are queued and written in batches: when a thousand clients go
        # at once, a few pipelines do it instead of a thousand round trips.
        self._records.pop(connection_id, None)
        filters = self._filters.pop(connection_id, set())
        self._removals.append((connection_id, filters))
        if self._removal_task is None:
            self._removal_task = asyncio.get_running_loop().create_task(
                self._flush_removals()
            )

    async def add_subscriptions(
        self, connection_id: str, topic_filters: Iterable[str]
    ) -> None:
        held = self._filters.get(connection_id)
        if held is None:
            return
        held.update(topic_filters)
        await self._quietly(self._write_records([connection_id]))

    async def remove_subscriptions(
        self, connection_id: str, topic_filters: Iterable[str]
    ) -> None:
        held = self._filters.get(connection_id)
        if held is None:
            return
        gone = held & set(topic_filters)
        held -= gone
        key = f"{self._prefix}conn:{connection_id}:filters"

        async def remove() -> None:
            async with self._client().pipeline(transaction=False) as pipe:
                for topic_filter in gone:
                    pipe.srem(key, topic_filter)
                    pipe.zrem(f"{self._prefix}subs:{topic_filter}", connection_id)
                await pipe.execute()

        if gone:
            await self._quietly(remove())

    async def _quietly(self, work: Any) -> None:
        # Registry writes are not worth failing a client for: while Redis is away
        # the replica keeps serving, and the next refresh writes everything again.
        try:
            await work
        except (RedisError, OSError) as exc:
            self._set_ready(False, exc)

    async def connection_count(self) -> int:
        client = self._client()
        key = f"{self._prefix}connections"
        try:
            await client.zremrangebyscore(key, "-inf", time.time())
            return int(await client.zcard(key))
        except (RedisError, OSError) as exc:
            raise Unavailable("redis unavailable") from exc

    async def topic_stats(self) -> list[TopicStats]:
        client = self._client()
        now = time.time()
        stats: dict[str, TopicStats] = {}
        try:
            async for key in client.scan_iter(match=f"{self._prefix}subs:*", count=500):
                name = key.decode()[len(self._prefix) + len("subs:") :]
                # Members left by crashed replicas have expired: drop them here,
                # so these sets do not grow for ever.
                await client.zremrangebyscore(key, "-inf", now)
                count = int(await client.zcard(key))
                if count:
                    stats[name] = TopicStats(name, subscribers=count)
            async for key in client.scan_iter(
                match=f"{self._prefix}{{*}}:seq", count=500
            ):
                name = key.decode()[len(self._prefix) + 1 : -len("}:seq")]
                last = int(await client.get(key) or 0)
                stats.setdefault(name, TopicStats(name)).last_offset = last
        except (RedisError, OSError) as exc:
            raise Unavailable("redis unavailable") from exc
        return [stats[name] for name in sorted(stats)]


def _is_pattern(channel: str) -> bool:
    # Topic names hold no '*', so only the globs of wildcard filters do.
    return "*" in channel


def _offset_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[1])
