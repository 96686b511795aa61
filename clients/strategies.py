"""Python clients of the gateway, one per strategy, behind one interface.

Each client subscribes to topics and yields events, in offset order per topic::

    async with WebSocketSubscriber("http://127.0.0.1:8000", ["fixtures/x"]) as sub:
        async for event in sub:
            print(event.topic, event.offset, event.delay())

========================= ============================= ==========================
class                     transport                     how it resumes
========================= ============================= ==========================
``PollingSubscriber``     ``GET /topics/{t}/events``    ``since`` = last offset
``WebSocketSubscriber``   ``/ws``                       ``subscribe`` + ``offsets``
``MqttSubscriber``        an MQTT broker (aiomqtt)      persistent session, QoS 1
========================= ============================= ==========================

Every client runs one background task that connects, subscribes, reads and, when
the connection breaks or the gateway refuses for a while, reconnects with
exponential backoff. Events are deduplicated by (topic, offset): a client keeps
the last offset it yielded per topic and drops anything at or below it, which
removes the redeliveries that resuming or QoS 1 can bring. Loss-free resume holds
within what the gateway keeps: its history (``--history-size`` events per topic,
in Redis across restarts) for polling and WebSocket, and, for MQTT, what the
broker queues for a persistent session, which covers only topics published at
QoS 1 (by default ``fixtures/#``, ``teams/#`` and ``jobs/#``); QoS 0 topics such
as ``stocks/#`` may lose what was published while the client was away.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiomqtt
import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

__all__ = [
    "STRATEGIES",
    "Backoff",
    "Event",
    "MqttSubscriber",
    "PollingSubscriber",
    "SubscribeError",
    "Subscriber",
    "WebSocketSubscriber",
    "make_subscriber",
]

logger = logging.getLogger(__name__)

#: The names ``make_subscriber`` and the command line take.
STRATEGIES = ("poll", "ws", "mqtt")


class SubscribeError(Exception):
    """The gateway or broker refused a subscription: retrying would not help."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the gateway stamped it."""

    topic: str
    offset: int
    id: str
    #: When the gateway accepted the event, in seconds since the epoch.
    published_at: float
    event_source: str
    event_type: str
    details: dict[str, Any]
    #: The time this client read it, in seconds since the epoch.
    received_at: float

    @classmethod
    def from_message(cls, message: Mapping[str, Any], received_at: float) -> Event:
        """Build an event from a decoded event message.

        Raises:
            KeyError: a field is missing.
            ValueError: ``publishedAt`` is not an ISO 8601 time.
        """
        return cls(
            topic=message["topic"],
            offset=int(message["offset"]),
            id=message["id"],
            published_at=datetime.fromisoformat(message["publishedAt"]).timestamp(),
            event_source=message["eventSource"],
            event_type=message["eventType"],
            details=message["eventDetails"],
            received_at=received_at,
        )

    def delay(self) -> float:
        """Seconds from the gateway's publish time to this client's receipt.

        Both clocks are read on their own machines; on one machine they agree.
        """
        return self.received_at - self.published_at


@dataclass
class Backoff:
    """Exponential backoff with jitter between reconnection attempts.

    Delays start at ``initial`` seconds and double up to ``maximum``; each is
    multiplied by a random factor from 0.8 to 1.2 so that many clients cut off
    together do not come back together. ``reset`` after a success.
    """

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    _attempts: int = field(default=0, init=False)

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; counts the attempt."""
        base = min(self.maximum, self.initial * self.factor**self._attempts)
        self._attempts += 1
        return base * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """Start again from ``initial`` (after a successful connection)."""
        self._attempts = 0


# Something the background task puts in the queue to end iteration.
_END = object()


class Subscriber(abc.ABC):
    """Subscribe to topics and iterate over their events, across reconnections.

    Use it as an async context manager: entering starts the background task and
    waits until the first subscription is in place, so that events published
    afterwards are received; leaving stops it. Iterate with ``async for``; only
    one task may iterate at a time. Iteration ends after ``close`` and raises
    ``SubscribeError`` if a subscription was refused. Cancelling a task that
    waits for the next event is safe: no event is lost by it.
    """

    def __init__(
        self,
        topics: Sequence[str],
        *,
        offsets: Mapping[str, int] | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        """Prepare the client; nothing connects before ``__aenter__``.

        Args:
            topics: topics (or, except for polling, topic filters).
            offsets: per topic, the last offset already seen, to resume after it
                (polling and WebSocket; MQTT resumes through its session).
            backoff: delays between reconnection attempts.
            connect_timeout: seconds ``__aenter__`` waits for the first
                subscription before it raises ``TimeoutError``.
        """
        if not topics:
            raise ValueError("at least one topic is needed")
        self.topics = tuple(topics)
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        # The last offset yielded per topic: the resume point and the
        # deduplication mark.
        self.offsets: dict[str, int] = dict(offsets or {})
        #: Connections made after the first one.
        self.reconnects = 0
        #: Events dropped because their (topic, offset) was already yielded.
        self.duplicates = 0
        #: Offset ranges the gateway said were gone from history: (topic, from, to).
        self.gaps: list[tuple[str, int, int]] = []
        self._queue: asyncio.Queue[Event | BaseException | object] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connections = 0
        # Why the last connection attempt ended, told if subscribing times out.
        self._last_failure: str | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run_forever())
        waiter = asyncio.create_task(self._ready.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, self._task},
                timeout=self.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        if self._task in done:
            await self.close()
            item = self._queue.get_nowait() if not self._queue.empty() else None
            if isinstance(item, BaseException):
                raise item
            raise SubscribeError("the client stopped before subscribing")
        if not done:
            await self.close()
            why = f": {self._last_failure}" if self._last_failure else ""
            raise TimeoutError(f"not subscribed within {self.connect_timeout} s{why}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the background task and end iteration; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._queue.put_nowait(_END)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Event)
        return item

    async def _run_forever(self) -> None:
        """Connect, read until the connection breaks, wait, and again."""
        while True:
            try:
                await self._session()
            except SubscribeError as exc:
                self._queue.put_nowait(exc)
                return
            except (OSError, TimeoutError, _Retry) as exc:
                self._last_failure = str(exc) or type(exc).__name__
                logger.debug("%s: connection ended: %s", type(self).__name__, exc)
            except Exception as exc:
                # A bug or a message this client cannot read: retrying would
                # repeat it, so the iterating task gets the exception.
                logger.exception("%s failed", type(self).__name__)
                self._queue.put_nowait(exc)
                return
            delay = self.backoff.next_delay()
            logger.debug("%s: reconnecting in %.2f s", type(self).__name__, delay)
            await asyncio.sleep(delay)

    @abc.abstractmethod
    async def _session(self) -> None:
        """One connection: connect, subscribe (then ``_subscribed``), read.

        Returns or raises ``OSError``, ``TimeoutError`` or ``_Retry`` when the
        connection ends; ``SubscribeError`` ends the client.
        """

    def _subscribed(self) -> None:
        """Note a connection whose subscriptions are in place."""
        self._connections += 1
        if self._connections > 1:
            self.reconnects += 1
        self.backoff.reset()
        self._ready.set()

    def _deliver(self, message: Mapping[str, Any], received_at: float) -> None:
        """Queue an event message unless its (topic, offset) was yielded already."""
        event = Event.from_message(message, received_at)
        if event.offset <= self.offsets.get(event.topic, 0):
            self.duplicates += 1
            return
        self.offsets[event.topic] = event.offset
        self._queue.put_nowait(event)


class _Retry(Exception):
    """This connection is over; try again after the backoff delay."""


def _http_base(url: str) -> str:
    """``http://host:port`` from a gateway URL given as http(s):// or ws(s)://."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"gateway URL {url!r}: expected http://host:port")
    return f"{scheme}://{parts.netloc}"


class WebSocketSubscriber(Subscriber):
    """Events over the gateway's WebSocket, resumed with ``offsets``.

    On every reconnection it subscribes again to its filters with, for every
    topic it has seen, the last offset it yielded: the gateway replays what it
    still keeps after it, then live events. A ``gap`` message (events no longer
    kept) is logged at WARNING and noted in ``gaps``. An ``offset_ahead`` error
    (the gateway's history was reset) makes the client forget its offsets, so
    that the lower offsets that follow are not taken for duplicates.
    """

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        token: str | None = None,
        **options: Any,
    ) -> None:
        """Args: ``url``, the gateway (http:// or ws://); ``token``, a JWT sent
        as ``Authorization: Bearer`` on the upgrade (anonymous when None);
        others, see ``Subscriber``."""
        super().__init__(topics, **options)
        base = _http_base(url)
        self.url = base.replace("http", "ws", 1) + "/ws"
        self.token = token

    async def _session(self) -> None:
        try:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            async with connect(
                self.url,
                open_timeout=self.connect_timeout,
                compression=None,
                additional_headers=headers,
            ) as connection:
                await self._subscribe(connection)
                async for raw in connection:
                    self._on_message(orjson.loads(raw), time.time())
        except WebSocketException as exc:
            raise _Retry(str(exc)) from exc

    async def _subscribe(self, connection: ClientConnection) -> None:
        welcome = orjson.loads(await connection.recv())
        if welcome.get("type") != "welcome":
            raise _Retry(f"expected a welcome message, got {welcome!r}")
        request: dict[str, Any] = {"op": "subscribe", "topics": list(self.topics)}
        if self.offsets:
            request["offsets"] = dict(self.offsets)
        await connection.send(orjson.dumps(request).decode())
        # Replayed events may come before the answer; they are delivered at once.
        while True:
            message = orjson.loads(await connection.recv())
            kind = message.get("type")
            if kind == "subscribed":
                self._subscribed()
                return
            if kind == "error" and message.get("code") not in ("offset_ahead",):
                raise SubscribeError(f"{message.get('code')}: {message.get('message')}")
            self._on_message(message, time.time())

    def _on_message(self, message: dict[str, Any], received_at: float) -> None:
        kind = message.get("type")
        if kind == "event":
            self._deliver(message, received_at)
        elif kind == "gap":
            gap = (message["topic"], message["fromOffset"], message["toOffset"])
            self.gaps.append(gap)
            logger.warning("events lost from history: %s offsets %s to %s", *gap)
        elif kind == "error" and message.get("code") == "offset_ahead":
            logger.warning("gateway history was reset: %s", message.get("message"))
            self.offsets.clear()
        elif kind == "error":
            logger.warning("gateway error: %s", message)


class PollingSubscriber(Subscriber):
    """Events by polling ``GET /topics/{topic}/events?since=``, one task per topic.

    Each topic is polled from its last offset, with ``If-None-Match`` and the
    last ETag. Between two polls it waits the gateway's ``Retry-After`` or
    ``interval``, whichever is longer; an answer with ``more`` is followed at
    once. A new subscriber starts after the topic's last offset, as a WebSocket
    one does. Topic filters with wildcards cannot be polled.
    """

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        interval: float | None = None,
        limit: int = 1000,
        **options: Any,
    ) -> None:
        """Args: ``url``, the gateway; ``interval``, the least seconds between two
        polls of a topic (None: what the gateway's ``Retry-After`` says, else 1 s);
        ``limit``, the most events per answer; others, see ``Subscriber``."""
        super().__init__(topics, **options)
        for topic in self.topics:
            if "+" in topic.split("/") or "#" in topic.split("/"):
                raise ValueError(f"cannot poll the topic filter {topic!r}")
        self.base = _http_base(url)
        self.interval = interval
        self.limit = limit
        #: Requests answered (200 and 304).
        self.requests = 0
        self._started: set[str] = set()

    async def _session(self) -> None:
        # The connection counts as subscribed once every topic was answered.
        self._started = set()
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as http:
            try:
                async with asyncio.TaskGroup() as group:
                    for topic in self.topics:
                        group.create_task(self._poll_topic(http, topic))
            except ExceptionGroup as failures:
                # One topic's failure ends the session; a refusal wins.
                refused = failures.subgroup(SubscribeError)
                first = (refused or failures).exceptions[0]
                raise first from None

    async def _poll_topic(self, http: httpx.AsyncClient, topic: str) -> None:
        path = f"/topics/{quote(topic, safe='/')}/events"
        etag: str | None = None
        while True:
            since = self.offsets.get(topic)
            params: dict[str, int] = {"since": since or 0, "limit": self.limit}
            if since is None:
                # New here: start after the last offset, as live subscribers do.
                params["limit"] = 1
            headers = {"If-None-Match": etag} if etag else {}
            try:
                response = await http.get(path, params=params, headers=headers)
            except httpx.HTTPError as exc:
                raise _Retry(f"poll of {topic!r}: {exc}") from exc
            wait, more = self._on_answer(topic, response, since is None)
            if topic not in self._started:
                self._mark_started(topic)
            etag = response.headers.get("etag")
            if not more:
                await asyncio.sleep(wait)

    def _on_answer(
        self, topic: str, response: httpx.Response, first: bool
    ) -> tuple[float, bool]:
        """Handle one answer; return the seconds to wait and whether more is due."""
        now = time.time()
        if response.status_code >= 500:
            raise _Retry(f"poll of {topic!r}: status {response.status_code}")
        self.requests += 1
        wait = self._wait(response)
        if response.status_code == 304:
            return wait, False
        body = response.json()
        if response.status_code == 400:
            code = body.get("error", {}).get("code")
            if code != "offset_ahead":
                raise SubscribeError(f"poll of {topic!r}: {body}")
            logger.warning("gateway history of %r was reset; polling from 0", topic)
            self.offsets[topic] = 0
            return 0.0, True
        if response.status_code != 200:
            raise SubscribeError(f"poll of {topic!r}: {response.status_code} {body}")
        if first:
            self.offsets[topic] = body["lastOffset"]
            return wait, False
        if body["truncated"]:
            gap = (topic, self.offsets.get(topic, 0) + 1, body["firstOffset"] - 1)
            self.gaps.append(gap)
            logger.warning("events lost from history: %s offsets %s to %s", *gap)
        for message in body["events"]:
            self._deliver(message, now)
        return wait, bool(body["more"])

    def _wait(self, response: httpx.Response) -> float:
        retry_after = response.headers.get("retry-after", "")
        try:
            told = float(retry_after)
        except ValueError:
            told = 0.0
        if self.interval is None:
            return told or 1.0
        return max(self.interval, told)

    def _mark_started(self, topic: str) -> None:
        self._started.add(topic)
        if self._started == set(self.topics):
            self._subscribed()


class MqttSubscriber(Subscriber):
    """Events from an MQTT broker the gateway publishes to, over aiomqtt.

    The client connects with a fixed client identifier and a persistent session
    (clean session off) and subscribes at QoS 1, so that the broker keeps what
    is published at QoS 1 while the client is away and sends it on its return.
    QoS 1 is at least once: redeliveries are dropped by (topic, offset).
    """

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        client_id: str | None = None,
        prefix: str = "",
        keepalive: int = 60,
        **options: Any,
    ) -> None:
        """Args: ``url``, the broker (mqtt://[user:password@]host:port);
        ``client_id``, the session's identifier, fixed for the client's life
        (give the same one to a new process to take the session over; a random
        one by default); ``prefix``, the gateway's ``--mqtt-prefix``;
        ``keepalive``, seconds; others, see ``Subscriber``."""
        super().__init__(topics, **options)
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"broker URL {url!r}: expected mqtt://host:port")
        self.host = parts.hostname
        self.port = parts.port or 1883
        self.username = parts.username
        self.password = parts.password
        self.client_id = client_id or f"gateway-sdk-{secrets.token_hex(6)}"
        self.prefix = prefix
        self.keepalive = keepalive

    async def _session(self) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            clean_session=False,
            username=self.username,
            password=self.password,
            keepalive=self.keepalive,
            timeout=self.connect_timeout,
        )
        try:
            async with client:
                for topic in self.topics:
                    granted = await client.subscribe(self.prefix + topic, qos=1)
                    if _refused(granted):
                        raise SubscribeError(f"broker refused {topic!r}")
                self._subscribed()
                async for message in client.messages:
                    self._on_payload(message.payload)
        except aiomqtt.MqttError as exc:
            raise _Retry(str(exc)) from exc

    def _on_payload(self, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray):
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            logger.debug("ignored a payload that is not JSON")
            return
        if isinstance(message, dict) and message.get("type") == "event":
            self._deliver(message, time.time())


def _refused(granted: Any) -> bool:
    """Whether a SUBACK refused the subscription (aiomqtt gives codes or a list)."""
    codes: list[Any] = list(granted) if isinstance(granted, list | tuple) else [granted]
    return any(int(getattr(code, "value", code)) >= 0x80 for code in codes)


def make_subscriber(
    via: str,
    topics: Sequence[str],
    *,
    url: str,
    mqtt_url: str,
    poll_interval: float | None = None,
    **options: Any,
) -> Subscriber:
    """The client of strategy ``via`` (one of ``STRATEGIES``).

    Raises:
        ValueError: ``via`` is unknown, or a URL or topic does not fit it.
    """
    if via == "poll":
        return PollingSubscriber(url, topics, interval=poll_interval, **options)
    if via == "ws":
        return WebSocketSubscriber(url, topics, **options)
    if via == "mqtt":
        return MqttSubscriber(mqtt_url, topics, **options)
    raise ValueError(f"unknown strategy {via!r}; choose from {STRATEGIES}")
