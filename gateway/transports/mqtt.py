"""The MQTT bridge: every event this replica accepts, published to a broker.

The replica whose publish API accepted an event publishes it, once, under the same
topic (after an optional prefix) with the same payload bytes as the WebSocket frame.
Other replicas see the event only through the fan-out and never publish it, so MQTT
subscribers get one message per event however many replicas run.

Ingest never waits for the broker. Accepted events go into a bounded buffer that one
task drains in order; while the broker is away another task reconnects with backoff
and the buffer keeps what arrives meanwhile, up to its cap.

Events whose rule asks for QoS 1 are published to the broker at QoS 2, over one MQTT
session that outlives each connection (clean session off). If a connection breaks
after the broker took an event but before it acknowledged it, the client sends that
same packet again, flagged DUP, on the next connection, and the broker recognises it
instead of taking it a second time: subscribers get each event once. Subscribers
get the QoS they subscribe with, up to 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho

from gateway.errors import BadTopic
from gateway.events.envelope import Event
from gateway.events.topics import filter_matches, validate_filter
from gateway.metrics import Metrics

__all__ = [
    "DEFAULT_QOS_RULES",
    "BrokerAddress",
    "MqttBridge",
    "QosRule",
    "parse_broker_url",
    "parse_qos_rules",
    "qos_for",
]

logger = logging.getLogger(__name__)

#: QoS and retain flag per topic filter, first match wins: ``filter=qos`` with an
#: ``r`` after the QoS for retained. Topics no rule matches get QoS 0, not retained.
DEFAULT_QOS_RULES = "stocks/#=0r,fixtures/#=1,teams/#=1,jobs/#=1r"

#: Seconds before the first reconnection attempt; doubled after each failure.
_FIRST_BACKOFF = 0.25
#: Longest wait between two attempts, kept short so that events flow again soon
#: after the broker returns.
_MAX_BACKOFF = 2.0
#: Seconds allowed for connecting and for each acknowledgement from the broker.
_BROKER_TIMEOUT = 5.0
#: Seconds between MQTT pings; a broker that stops answering is given up on after
#: one and a half of these.
_KEEPALIVE = 10


class _OutageIsNotAnError(logging.Filter):
    """Turn paho's ERROR for a lost connection into DEBUG.

    paho logs a connection reset by the broker at ERROR; for the gateway that is a
    handled outage, which the bridge reports once at WARNING itself. Records with
    a traceback (a failing callback) keep their level.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and not record.exc_info:
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
            return _client_logger.isEnabledFor(logging.DEBUG)
        return True


#: Where paho's and aiomqtt's own records go; aiomqtt's default logger has its
#: level set by aiomqtt, which is the application's business.
_client_logger = logging.getLogger(f"{__name__}.client")
_client_logger.addFilter(_OutageIsNotAnError())


class _LoopSafeClient(aiomqtt.Client):
    """aiomqtt's client, with paho's socket put on and taken off the loop safely.

    aiomqtt 2.5.1 hands paho's socket to the event loop (``add_reader``,
    ``add_writer``) through ``call_soon_threadsafe``, even when paho asks from the
    loop's own thread, so each registration runs a moment after it was asked for.
    When the connection broke in that moment (any broker outage: paho closes the
    socket as soon as it reads the end of the stream or misses a ping), the loop
    was given a closed socket, or a file descriptor number that a new socket, such
    as a client's HTTP connection, had taken meanwhile. asyncio then logged
    ``Exception in callback Loop.add_writer`` at ERROR (uvloop's ``Bad file
    descriptor``, ``the handler is closed``, ``File descriptor N is used by
    transport``), and a registration on a reused number could disturb the
    connection that now held it. paho also
    closed the previous connection's socket when connecting again, inside the
    executor thread where aiomqtt runs ``connect()``, so its descriptor left the
    loop from the wrong thread, after it was closed.

    Here a registration asked for on the loop's thread happens at once; one asked
    for from the executor thread is checked when it runs (the socket must still
    be paho's, and open); removals use the numbers that were registered; and the
    previous socket is closed on the loop before connecting again. The deferral
    came with aiomqtt's pull requests 170 and 175; this class can go when aiomqtt
    registers at once on the loop's thread and checks a deferred registration.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take aiomqtt's arguments; must be called on the loop's thread."""
        super().__init__(*args, **kwargs)
        # The thread running the loop: paho's callbacks from any other one (the
        # executor running connect()) must be passed to the loop.
        self._loop_thread = threading.get_ident()
        # The descriptor numbers registered for reading and for writing, kept
        # because a socket that paho has closed answers fileno() with -1.
        self._reading: int | None = None
        self._writing: int | None = None
        client = self._client
        client.on_socket_open = self._socket_opened
        client.on_socket_close = self._socket_closing
        client.on_socket_register_write = self._socket_wants_writing
        client.on_socket_unregister_write = self._socket_written

    async def __aenter__(self) -> _LoopSafeClient:
        """Connect, after closing here what is left of the previous connection.

        A connection given up before its end (no CONNACK in time, a DISCONNECT
        that could not be written) leaves paho's socket open; paho would close it
        in the executor thread on connecting, after it left the loop too late.
        """
        if self._client.socket() is not None:
            self._client._sock_close()
        await super().__aenter__()
        return self

    def _on_loop(self, action: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            action(*args)
        else:
            self._loop.call_soon_threadsafe(action, *args)

    @staticmethod
    def _current(client: paho.Client, sock: Any) -> bool:
        # False once paho closed or replaced the socket: it forgets a socket
        # before closing it.
        current = client.socket()
        return current is not None and current is sock and current.fileno() >= 0

    def _socket_opened(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._start_reading, client, sock)

    def _start_reading(self, client: paho.Client, sock: Any) -> None:
        if not self._current(client, sock):
            return
        self._stop_reading()
        self._reading = sock.fileno()
        self._loop.add_reader(self._reading, self._read_ready, client)
        self._misc_task = self._loop.create_task(self._misc_loop())

    def _read_ready(self, client: paho.Client) -> None:
        try:
            while True:
                client.loop_read()
                # An SSL socket may hold decoded bytes that the loop cannot see.
                pending = getattr(client.socket(), "pending", None)
                if pending is None or not pending():
                    break
        except Exception as exc:
            # A broken connection, as aiomqtt treats it: the client disconnects.
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _socket_closing(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._stop_reading)

    def _stop_reading(self) -> None:
        self._stop_writing()
        if self._reading is not None:
            self._loop.remove_reader(self._reading)
            self._reading = None
        if self._misc_task is not None and not self._misc_task.done():
            self._misc_task.cancel()

    def _socket_wants_writing(
        self, client: paho.Client, userdata: Any, sock: Any
    ) -> None:
        self._on_loop(self._start_writing, client, sock)

    def _start_writing(self, client: paho.Client, sock: Any) -> None:
        if not self._current(client, sock) or self._writing is not None:
            return
        self._writing = sock.fileno()
        self._loop.add_writer(self._writing, self._write_ready, client)

    def _write_ready(self, client: paho.Client) -> None:
        try:
            client.loop_write()
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
        # paho forgets to ask for the removal when the socket went meanwhile;
        # a writer left on a writable socket would run on every loop turn.
        if not client.want_write() or client.socket() is None:
            self._stop_writing()

    def _socket_written(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._stop_writing)

    def _stop_writing(self) -> None:
        if self._writing is not None:
            self._loop.remove_writer(self._writing)
            self._writing = None


@dataclass(frozen=True, slots=True)
class QosRule:
    """How events on topics matching ``topic_filter`` are published."""

    topic_filter: str
    qos: int
    retain: bool


def parse_qos_rules(text: str) -> tuple[QosRule, ...]:
    """Read rules such as ``stocks/#=0r,jobs/#=1r``; an empty text means none.

    Raises:
        ValueError: an item is not ``filter=qos`` or ``filter=qosr`` with a valid
            filter and a QoS of 0, 1 or 2.
    """
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        topic_filter, sep, flags = item.rpartition("=")
        topic_filter, flags = topic_filter.strip(), flags.strip()
        retain = flags.endswith("r")
        qos = flags.removesuffix("r")
        if not sep or qos not in ("0", "1", "2"):
            raise ValueError(f"bad rule {item!r}: expected filter=QOS or filter=QOSr")
        try:
            validate_filter(topic_filter, max_length=65535, max_depth=64)
        except BadTopic as exc:
            raise ValueError(f"bad rule {item!r}: {exc}") from exc
        rules.append(QosRule(topic_filter, int(qos), retain))
    return tuple(rules)


def qos_for(topic: str, rules: Iterable[QosRule]) -> tuple[int, bool]:
    """The QoS and retain flag of ``topic``: the first matching rule's, else 0."""
    for rule in rules:
        if filter_matches(rule.topic_filter, topic):
            return rule.qos, rule.retain
    return 0, False


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker listens and how to log in, read from its URL."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Read ``mqtt://user:password@host:port`` (or ``mqtts://`` for TLS).

    Raises:
        ValueError: the scheme is neither, or the host is missing.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"expected mqtt:// or mqtts://, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("no host in the broker URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a broker URL has no path, query or fragment")
    if parts.port == 0:
        raise ValueError("port 0 is not a broker's port")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


class MqttBridge:
    """Publishes accepted events to the broker, in order, from one task.

    ``submit`` may be called at any time from the event loop and never blocks.
    Events are published in the order they were submitted. While the broker is
    away, events with QoS 1 or 2 wait in the buffer and events with QoS 0 are
    dropped at once (they promise nothing). When the buffer is full the oldest
    buffered event is dropped to make room, so that a subscriber gets the most
    recent state when the broker returns. Every drop is counted.

    An event whose publish was under way when the connection broke stays with
    the MQTT client, which sends it again (flagged DUP) when it is connected
    again; the broker's half of the session keeps it from being taken twice.
    """

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics,
        client_id: str,
        prefix: str = "",
        buffer: int = 10_000,
        qos_rules: Iterable[QosRule] | None = None,
    ) -> None:
        """Set the bridge up; nothing connects before ``start``.

        Args:
            url: the broker, such as ``mqtt://gateway:secret@127.0.0.1:1883``.
            metrics: where the ``gateway_mqtt_*`` metrics are counted.
            client_id: the MQTT client identifier, unique per replica: a broker
                disconnects the older of two clients with the same identifier.
            prefix: put before every topic, as is (``gw/`` gives ``gw/stocks/X``).
            buffer: most events kept while the broker is away or slow.
            qos_rules: QoS and retain flag per topic filter, first match wins;
                ``DEFAULT_QOS_RULES`` when not given.

        Raises:
            ValueError: the URL is not a broker URL.
        """
        self.address = parse_broker_url(url)
        self.metrics = metrics
        self.client_id = client_id
        self.prefix = prefix
        self.capacity = buffer
        if qos_rules is None:
            qos_rules = parse_qos_rules(DEFAULT_QOS_RULES)
        self.qos_rules = tuple(qos_rules)
        # Events accepted and not yet published, oldest first, with their QoS
        # and retain flag worked out once at submit time.
        self._buffer: deque[tuple[Event, int, bool]] = deque()
        self._ready = asyncio.Event()
        # Set while nothing is buffered nor being published.
        self._flushed = asyncio.Event()
        self._flushed.set()
        # The event being published right now; it counts as buffered until the
        # broker acknowledged it, across reconnections if need be.
        self._inflight: tuple[Event, int, bool] | None = None
        # When the publish of ``_inflight`` started or, after a reconnection,
        # when the client sent it again; None while nothing waits for an answer.
        self._waiting_since: float | None = None
        # True between the broker's CONNACK and the loss of that connection.
        self.connected = False
        # Set while connected; the publishing task waits for it.
        self._up = asyncio.Event()
        # One client for the bridge's life: its MQTT session (unacknowledged
        # packets, their ids) must outlive every connection. Made in ``start``.
        self._client: aiomqtt.Client | None = None
        # Set while dropping for a full buffer, so that only the first drop of
        # an episode logs a warning.
        self._overflowing = False
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        metrics.mqtt_buffered.set_function(self.buffered)
        metrics.mqtt_connected.set_function(lambda: float(self.connected))

    def buffered(self) -> int:
        """Events accepted and not yet acknowledged by the broker."""
        return len(self._buffer) + (self._inflight is not None)

    def start(self) -> None:
        """Start the tasks that connect and publish; it does not wait for them."""
        loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._task = loop.create_task(self._run(self._client))
        self._publisher = loop.create_task(self._publish_all(self._client))

    async def close(self, *, flush_within: float) -> None:
        """Publish what is buffered for up to ``flush_within`` seconds; disconnect.

        Events still buffered after that are lost and counted as dropped.
        """
        if self._task is None:
            return
        if self.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_within):
                    await self._flushed.wait()
        tasks = [task for task in (self._publisher, self._task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._publisher = None
        left = self.buffered()
        if left:
            self.metrics.mqtt_dropped.inc(left)
            logger.warning("%d events not published to the broker at shutdown", left)

    def submit(self, events: Iterable[Event]) -> None:
        """Queue events for the broker, in order; never blocks."""
        for event in events:
            qos, retain = qos_for(event.topic, self.qos_rules)
            # See the module's docstring: QoS 2 to the broker, at most once more.
            qos = 2 if qos else 0
            if qos == 0 and not self.connected:
                self.metrics.mqtt_dropped.inc()
                continue
            if self.buffered() >= self.capacity:
                self._drop_oldest()
            self._buffer.append((event, qos, retain))
            self._flushed.clear()
        self._ready.set()

    def _drop_oldest(self) -> None:
        if not self._buffer:
            return
        self._buffer.popleft()
        self.metrics.mqtt_dropped.inc()
        if not self._overflowing:
            self._overflowing = True
            logger.warning(
                "MQTT buffer full at %d events; dropping the oldest", self.capacity
            )

    async def _run(self, client: aiomqtt.Client) -> None:
        """Connect, stay connected until the connection breaks, wait, and again."""
        backoff = _FIRST_BACKOFF
        down_since: float | None = None
        ever_connected = False
        while True:
            try:
                async with client:
                    self._on_connected(ever_connected, down_since)
                    ever_connected = True
                    down_since = None
                    backoff = _FIRST_BACKOFF
                    await self._stay_connected(client)
            except aiomqtt.MqttError as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning(
                        "broker %s unreachable (%s); reconnecting with backoff, "
                        "%d events buffered",
                        self.address,
                        exc,
                        self.buffered(),
                    )
            except Exception:
                # A bug here must not end MQTT publishing for the process' life.
                down_since = down_since or time.monotonic()
                logger.exception("MQTT bridge failed; reconnecting")
            finally:
                self.connected = False
                self._up.clear()
            # QoS 0 events gave no promise: do not let them wait for the broker.
            self._drop_unreliable()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _on_connected(self, again: bool, down_since: float | None) -> None:
        self.connected = True
        if again:
            self.metrics.mqtt_reconnects.inc()
        if self._waiting_since is not None:
            # The client sends the unacknowledged event again on connecting.
            self._waiting_since = time.monotonic()
        self._up.set()
        if down_since is None:
            logger.info("connected to broker %s as %s", self.address, self.client_id)
        else:
            logger.info(
                "connected to broker %s again after %.1f s; %d events buffered",
                self.address,
                time.monotonic() - down_since,
                self.buffered(),
            )

    def _make_client(self) -> aiomqtt.Client:
        address = self.address
        return _LoopSafeClient(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=self.client_id,
            clean_session=False,
            tls_context=ssl.create_default_context() if address.tls else None,
            timeout=_BROKER_TIMEOUT,
            keepalive=_KEEPALIVE,
            logger=_client_logger,
        )

    async def _stay_connected(self, client: aiomqtt.Client) -> None:
        """Return, with ``MqttError``, when the connection is lost or stalls."""
        # The bridge subscribes to nothing, so this iteration only ends, with
        # MqttError, when the connection is lost.
        watcher = asyncio.create_task(self._watch(client))
        # A broker that holds the connection open but stops answering (frozen,
        # overloaded) is only noticed by the keepalive after 15 s; an
        # acknowledgement overdue by ``_BROKER_TIMEOUT`` ends it sooner.
        stall = asyncio.create_task(self._watch_acknowledgements())
        try:
            await asyncio.wait({watcher, stall}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            stall.cancel()
            results = await asyncio.gather(watcher, stall, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        async for _ in client.messages:
            pass

    async def _watch_acknowledgements(self) -> None:
        while True:
            await asyncio.sleep(_BROKER_TIMEOUT / 10)
            since = self._waiting_since
            if since is not None and time.monotonic() - since > _BROKER_TIMEOUT:
                self.metrics.mqtt_failures.inc()
                raise aiomqtt.MqttError(
                    f"no acknowledgement from the broker in {_BROKER_TIMEOUT:.0f} s"
                )

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        """Publish buffered events one at a time, oldest first, forever."""
        while True:
            if not self._buffer:
                self._overflowing = False
                self._flushed.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._up.wait()
            if not self._buffer:
                continue
            item = self._inflight = self._buffer.popleft()
            self._waiting_since = time.monotonic()
            try:
                await self._publish(client, item)
            finally:
                self._inflight = None
                self._waiting_since = None

    async def _publish(
        self, client: aiomqtt.Client, item: tuple[Event, int, bool]
    ) -> None:
        """Publish one event and wait for the broker to acknowledge it.

        The wait has no time limit: a connection that breaks meanwhile is made
        again underneath by ``_run``, the client sends the event again, and the
        broker's acknowledgement then ends the wait.
        """
        event, qos, retain = item
        try:
            await client.publish(
                self.prefix + event.topic,
                event.payload,
                qos=qos,
                retain=retain,
                timeout=math.inf,
            )
        except aiomqtt.MqttCodeError as exc:
            self.metrics.mqtt_failures.inc()
            if qos and exc.rc == paho.MQTT_ERR_NO_CONN:
                # The connection broke just before: the client keeps the event
                # and sends it on connecting, with no one left to wait for it.
                self.metrics.mqtt_published.inc()
            elif qos and len(self._buffer) < self.capacity:
                self._buffer.appendleft(item)
            else:
                self.metrics.mqtt_dropped.inc()
            return
        self.metrics.mqtt_published.inc()

    def _drop_unreliable(self) -> None:
        """Drop the buffered QoS 0 events, counting them."""
        kept = deque(item for item in self._buffer if item[1] > 0)
        dropped = len(self._buffer) - len(kept)
        if dropped:
            self._buffer = kept
            self.metrics.mqtt_dropped.inc(dropped)
