"""The MQTT bridge: every event this replica accepts, published to a broker.

The replica whose publish API accepted an event publishes it, once, under the same
topic (after an optional prefix) with the same payload bytes as the WebSocket frame.
Other replicas see the event only through the fan-out and never publish it, so MQTT
subscribers get one message per event however many replicas run.

Ingest never waits for the broker. Accepted events go into a bounded buffer that one
task drains in order; while the broker is away that task reconnects with backoff and
the buffer keeps what arrives meanwhile, up to its cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt

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

    An event whose publish was under way when the connection broke is published
    again on the next connection: QoS 1 is at least once, and a subscriber may
    then get that one event twice.
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
        # broker acknowledged it, and goes back to the front if that fails.
        self._inflight: tuple[Event, int, bool] | None = None
        # True between the broker's CONNACK and the loss of that connection.
        self.connected = False
        # Set while dropping for a full buffer, so that only the first drop of
        # an episode logs a warning.
        self._overflowing = False
        self._task: asyncio.Task[None] | None = None
        metrics.mqtt_buffered.set_function(self.buffered)
        metrics.mqtt_connected.set_function(lambda: float(self.connected))

    def buffered(self) -> int:
        """Events accepted and not yet acknowledged by the broker."""
        return len(self._buffer) + (self._inflight is not None)

    def start(self) -> None:
        """Start the task that connects and publishes; it does not wait for it."""
        self._task = asyncio.get_running_loop().create_task(self._run())

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
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        left = self.buffered()
        if left:
            self.metrics.mqtt_dropped.inc(left)
            logger.warning("%d events not published to the broker at shutdown", left)

    def submit(self, events: Iterable[Event]) -> None:
        """Queue events for the broker, in order; never blocks."""
        for event in events:
            qos, retain = qos_for(event.topic, self.qos_rules)
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

    async def _run(self) -> None:
        """Connect, publish until the connection breaks, wait, and again."""
        backoff = _FIRST_BACKOFF
        down_since: float | None = None
        ever_connected = False
        while True:
            client = self._client()
            try:
                async with client:
                    self.connected = True
                    if ever_connected:
                        self.metrics.mqtt_reconnects.inc()
                    ever_connected = True
                    self._log_connected(down_since)
                    down_since = None
                    backoff = _FIRST_BACKOFF
                    await self._serve(client)
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
            # QoS 0 events gave no promise: do not let them wait for the broker.
            self._drop_unreliable()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _log_connected(self, down_since: float | None) -> None:
        if down_since is None:
            logger.info("connected to broker %s as %s", self.address, self.client_id)
        else:
            logger.info(
                "connected to broker %s again after %.1f s; %d events buffered",
                self.address,
                time.monotonic() - down_since,
                self.buffered(),
            )

    def _client(self) -> aiomqtt.Client:
        address = self.address
        return aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=self.client_id,
            tls_context=ssl.create_default_context() if address.tls else None,
            timeout=_BROKER_TIMEOUT,
            keepalive=_KEEPALIVE,
            logger=_client_logger,
        )

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until the connection breaks; raise ``MqttError`` then."""
        publisher = asyncio.create_task(self._publish_all(client))
        # The bridge subscribes to nothing, so this iteration only ends, with
        # MqttError, when the connection is lost; a publish waiting for its
        # acknowledgement would otherwise only notice at its timeout.
        watcher = asyncio.create_task(self._watch(client))
        try:
            await asyncio.wait(
                {publisher, watcher}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            publisher.cancel()
            watcher.cancel()
            results = await asyncio.gather(publisher, watcher, return_exceptions=True)
        for result in results:
            if isinstance(result, aiomqtt.MqttError):
                raise result
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        async for _ in client.messages:
            pass

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        """Publish buffered events one at a time, oldest first, forever."""
        while True:
            if not self._buffer:
                self._overflowing = False
                self._flushed.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            item = self._inflight = self._buffer.popleft()
            event, qos, retain = item
            try:
                await client.publish(
                    self.prefix + event.topic, event.payload, qos=qos, retain=retain
                )
            except BaseException as exc:
                # The broker may or may not have the event: publish it again on
                # the next connection (at least once), or count it lost.
                self._inflight = None
                if isinstance(exc, aiomqtt.MqttError):
                    self.metrics.mqtt_failures.inc()
                if qos and len(self._buffer) < self.capacity:
                    self._buffer.appendleft(item)
                else:
                    self.metrics.mqtt_dropped.inc()
                raise
            self._inflight = None
            self.metrics.mqtt_published.inc()

    def _drop_unreliable(self) -> None:
        """Drop the buffered QoS 0 events, counting them."""
        kept = deque(item for item in self._buffer if item[1] > 0)
        dropped = len(self._buffer) - len(kept)
        if dropped:
            self._buffer = kept
            self.metrics.mqtt_dropped.inc(dropped)
