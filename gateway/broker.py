"""The embedded MQTT broker, for a gateway started with no broker URL.

``gateway serve`` and ``gateway demo`` with no ``--mqtt-url`` start an amqtt broker
in a child process: a TCP listener for devices and a WebSocket listener for
browsers. A child process keeps the broker's fan-out off the gateway's event loop
(the two share no CPU-bound work, so on two cores they run side by side) and a
broker failure off the gateway's process.

The broker's rules are the production ones of ``deploy/mosquitto/``, kept small:

- Only the gateway publishes. It logs in as ``gateway`` with the gateway's API key
  as password; a publish from anyone else is dropped, as Mosquitto drops it.
- Anyone may subscribe, without logging in, to the public topic trees and to the
  topic of one job by its full id: a wildcard in place of a job id would reveal
  the ids, which are the jobs' valet keys.
- A login with any other name or a wrong password is refused.

``gateway broker`` runs the same broker on its own, for tests that stop and
restart a broker and for users who want one in a separate terminal.

amqtt 0.12.1 has faults that clients can trigger; each is worked around where
it lives (``_Broker``, ``_SubscriptionTable``, ``_SubscribePayload``,
``_StreamWriter``), with the upstream change that would let it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import amqtt.mqtt
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.codecs_amqtt import read_or_raise
from amqtt.contexts import Action
from amqtt.events import BrokerEvents
from amqtt.mqtt.packet import SUBSCRIBE
from amqtt.mqtt.subscribe import SubscribePacket, SubscribePayload
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from websockets.exceptions import InvalidHandshake

__all__ = [
    "MAX_FILTERS_PER_SUBSCRIBE",
    "MAX_SUBSCRIPTIONS",
    "PUBLISHER",
    "BrokerError",
    "EmbeddedBroker",
    "allowed_to_subscribe",
    "run_broker",
]

logger = logging.getLogger(__name__)

#: The only account that may publish: the gateway's own.
PUBLISHER = "gateway"
#: Topic trees every client may read.
PUBLIC_TREES = ("stocks", "fixtures", "teams")
#: Most topic filters one client (one client identifier) may hold, as many as
#: a WebSocket connection by default; a filter past it is refused (SUBACK 0x80).
MAX_SUBSCRIPTIONS = 100
#: Most filters in one SUBSCRIBE: one with more, which could not all be granted,
#: closes the connection unread, so that such packets cost the broker little.
MAX_FILTERS_PER_SUBSCRIBE = MAX_SUBSCRIPTIONS
#: The SUBACK return code of a refused filter.
_REFUSED = 0x80
#: Most messages broadcast in one turn of the broker's event loop.
_BROADCAST_BATCH = 100
#: What the child prints on its standard output once both listeners are up.
_READY_LINE = "broker ready"
#: Seconds the gateway gives its broker to start and, later, to stop.
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0


class BrokerError(Exception):
    """The embedded broker could not start; the message says why."""


def allowed_to_subscribe(topic_filter: str, prefix: str = "") -> bool:
    """Whether a client other than the gateway may subscribe to ``topic_filter``.

    The public trees are open to any filter within them. Job topics are open
    only by their full id: ``jobs/<id>``, with no wildcard for the id. With a
    ``prefix`` (the gateway's ``--mqtt-prefix``) the trees are under it.
    """
    if not topic_filter.startswith(prefix):
        return False
    levels = topic_filter[len(prefix) :].split("/")
    if levels[0] in PUBLIC_TREES:
        return True
    return (
        levels[0] == "jobs"
        and len(levels) == 2
        and levels[1] not in ("", "+", "#")
        and "+" not in levels[1]
        and "#" not in levels[1]
    )


class PublisherLogin(BaseAuthPlugin):  # type: ignore[misc]
    """Lets anonymous clients in, and the gateway with its password; no one else."""

    @dataclass
    class Config:
        """The gateway's password (its API key)."""

        password: str = ""

    async def authenticate(self, *, session: Any) -> bool:
        """Refuse a login under any name but the gateway's, or a wrong password."""
        username = session.username
        if username is None:
            return True
        password = session.password or ""
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        expected: str = self.context.config.password
        # Constant time, as for the HTTP API key.
        good = hmac.compare_digest(password.encode(), expected.encode())
        if username == PUBLISHER and expected and good:
            return True
        # Anyone can try; the gateway, if it is the one refused, says so itself.
        logger.debug("refused MQTT login as %r", username)
        return False


class TopicRules(BaseTopicPlugin):  # type: ignore[misc]
    """Only the gateway publishes; others read the public trees and single jobs."""

    @dataclass
    class Config:
        """What the gateway puts before every topic."""

        prefix: str = ""

    async def topic_filtering(
        self,
        *,
        session: Any = None,
        topic: str | None = None,
        action: Any = None,
    ) -> bool:
        """Allow or refuse one publish, subscription or delivery."""
        if session is not None and session.username == PUBLISHER:
            return True
        if action == Action.PUBLISH:
            logger.debug("dropped a publish to %r from a client that may not", topic)
            return False
        if action == Action.SUBSCRIBE:
            prefix: str = self.context.config.prefix
            allowed = topic is not None and allowed_to_subscribe(topic, prefix)
            if not allowed:
                logger.debug("refused a subscription to %r", topic)
            return allowed
        return True


class _SubscriptionTable(dict[str, list[tuple[Any, int]]]):
    """amqtt's table of subscriptions (filter to holders), read through copies.

    amqtt 0.12.1 loops over this table and awaits plugins inside the loop, when
    it broadcasts a message (``Broker._run_broadcast``) and when a client
    connects. A subscription that another client added or removed meanwhile
    ended the loop with ``RuntimeError: dictionary changed size during
    iteration``: the message reached no further subscriber, and asyncio logged
    "Task exception was never retrieved" at ERROR, once per message while
    clients came and went. Its loops go over copies here. Its repr, which amqtt
    builds after every SUBSCRIBE even with DEBUG off, is kept short. This class
    can go when amqtt iterates over a copy itself.
    """

    def items(self) -> list[tuple[str, list[tuple[Any, int]]]]:  # type: ignore[override]
        """A copy of the filters and their holders, as they are now."""
        return [(key, list(holders)) for key, holders in super().items()]

    def __iter__(self) -> Iterator[str]:
        """The filters as they are now."""
        return iter(list(super().__iter__()))

    def __repr__(self) -> str:
        """How many filters are held."""
        return f"<{len(self)} topic filters>"


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, with limits per client and a few of its faults worked around.

    It keeps, per client identifier, the filters that client holds, to refuse
    one past ``MAX_SUBSCRIPTIONS``.

    amqtt 0.12.1, on every connection, sends the retained messages of every
    filter that any session subscribes to, to the client that connects, whether
    or not that client subscribes to them: a late subscriber got a retained
    price twice, and any client got the retained state of jobs it never asked
    for. This sends them only when the session holds the subscription.

    amqtt 0.12.1 also handles a SUBSCRIBE that arrives with the client's
    DISCONNECT (or the end of its connection) after the disconnection, and adds
    its filters to a session that is gone or about to go: nothing removed them
    again, so under clients that subscribe and leave, the broker's memory and
    the time of each broadcast grew for good. Here a SUBSCRIBE is taken only
    from a connected session, and filters added while it went are removed.

    amqtt 0.12.1 also delivers to a connection that is going: retained
    messages after the client's SUBSCRIBE and DISCONNECT arrived together,
    broadcasts after its DISCONNECT or the end of its connection. At QoS 1 or
    2 each such delivery waited 5 s for an acknowledgement that could not
    come, holding its memory, and failed with a ``TimeoutError`` that amqtt
    never retrieved: asyncio logged "Task exception was never retrieved" at
    ERROR, once per retained message per client. Here a connection that got
    its client's DISCONNECT, or whose handler stopped, has no handler to
    deliver through, and the outcome of every retained delivery is read. A
    delivery that was under way when the client left still times out, logged
    at DEBUG (see ``_ClientMistakesAtDebug``).

    These workarounds, and the one in ``_run_broadcast``, can go when amqtt
    does the same.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        """Make the broker; nothing listens before ``start``."""
        super().__init__(config)
        self._subscriptions = _SubscriptionTable()
        # Client identifier to the filters it holds; amqtt knows a holder by
        # its identifier too, and keeps no such count.
        self._held: dict[str, set[str]] = {}

    async def add_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> int:
        """Add one subscription as amqtt does, noting it for the client."""
        code: int = await super().add_subscription(subscription, session)
        if code != _REFUSED:
            self._held.setdefault(session.client_id, set()).add(subscription[0])
        return code

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        held = self._held.get(session.client_id)
        if deleted and held is not None:
            held.discard(a_filter)
            if not held:
                del self._held[session.client_id]
        return deleted

    async def _del_all_subscriptions(self, session: Any) -> None:
        # amqtt looks through every filter held by anyone; this, through the
        # client's own.
        self._remove(session, list(self._held.get(session.client_id, ())))

    async def _handle_disconnect(
        self, client_session: Any, handler: Any, disconnect_waiter: Any
    ) -> None:
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        # amqtt forgets a clean session only at its next check, once a second,
        # and until then every broadcast and every connection looks through
        # its filters: under clients connecting hundreds of times a second,
        # that was most of the broker's work. A clean session ends with its
        # connection [MQTT-3.1.2-6], so its filters go now, unless a new
        # connection has taken the client identifier over.
        current = self._sessions.get(client_session.client_id, (None, None))[0]
        if client_session.clean_session and (
            current is None or current is client_session
        ):
            await self._del_all_subscriptions(client_session)

    async def stream_connected(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener_name: str,
    ) -> None:
        """Serve one TCP connection as amqtt does, through ``_StreamWriter``."""
        await self._client_connected(
            listener_name, StreamReaderAdapter(reader), _StreamWriter(writer)
        )

    def _get_handler(self, session: Any) -> Any:
        # amqtt delivers every message through the handler this returns; a
        # connection that is going gets none, so nothing waits on it.
        handler = super()._get_handler(session)
        if handler is None or _is_leaving(handler):
            return None
        return handler

    def _is_connected(self, session: Any) -> bool:
        # Also false once a new connection took the client identifier over.
        current = self._sessions.get(session.client_id, (None, None))[0]
        return current is session and session.transitions.state == "connected"

    async def _handle_subscription(
        self, client_session: Any, handler: Any, subscribe_waiter: Any
    ) -> None:
        """Answer one SUBSCRIBE, refusing (0x80) the filters past the limits."""
        request = subscribe_waiter.result()
        client_id = client_session.client_id
        if not self._is_connected(client_session):
            # Sent just before the client left: nobody waits for the SUBACK.
            logger.debug("ignored a SUBSCRIBE from %s after it left", client_id)
            return

        codes = []
        added = []
        for subscription in request.topics:
            held = self._held.get(client_id, set())
            new = subscription[0] not in held
            if new and len(held) >= MAX_SUBSCRIPTIONS:
                codes.append(_REFUSED)
                continue
            code = await self.add_subscription(subscription, client_session)
            codes.append(code)
            if new and code != _REFUSED:
                added.append(subscription[0])
            if not self._is_connected(client_session):
                # Taken over while a plugin answered: the filters go with it.
                self._remove(client_session, added)
                return
        refused = codes.count(_REFUSED)
        if refused:
            logger.debug(
                "refused %d of %d filters from %s", refused, len(codes), client_id
            )

        await handler.mqtt_acknowledge_subscription(request.packet_id, codes)

        # As amqtt does after the SUBACK: tell plugins (persistence) and send
        # the retained messages of each filter granted.
        for (topic_filter, qos), code in zip(request.topics, codes, strict=True):
            if code == _REFUSED:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_id,
                topic=topic_filter,
                qos=qos,
            )
            await self._publish_retained_messages_for_subscription(
                (topic_filter, qos), client_session
            )

    def _remove(self, session: Any, filters: list[str]) -> None:
        for topic_filter in filters:
            self._del_subscription(topic_filter, session)
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]

    async def _run_broadcast(self, running_tasks: Any) -> None:
        # amqtt's broadcast loop starts a task for each message it takes from
        # its queue and waits for it: one message per turn of the event loop.
        # With the loop busy with other clients, a turn took milliseconds and
        # messages came in faster than they went out, so subscribers fell
        # seconds behind. The messages waiting go out together here, in order.
        await super()._run_broadcast(running_tasks)
        for _ in range(_BROADCAST_BATCH - 1):
            if self._broadcast_queue.empty():
                return
            await super()._run_broadcast(running_tasks)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        # As amqtt does, but only for a filter the session holds, only while
        # its connection stays, and reading the outcome of each delivery.
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None or topic_filter not in self._held.get(session.client_id, ()):
            return
        deliveries = [
            asyncio.create_task(
                handler.mqtt_publish(
                    message.topic,
                    message.data,
                    min(qos, message.qos or qos),
                    retain=True,
                )
            )
            for topic, message in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
        ]
        if not deliveries:
            return
        await asyncio.wait(deliveries)
        for delivery in deliveries:
            # Cancelled or failed when the client left without acknowledging.
            error = None if delivery.cancelled() else delivery.exception()
            if error is not None:
                logger.debug(
                    "retained message to %s not delivered: %s", session.client_id, error
                )


def _is_leaving(handler: Any) -> bool:
    """Whether amqtt's handler got its client's DISCONNECT or was stopped.

    Its disconnect waiter, set when the handler starts, is dropped on a
    DISCONNECT and when the handler stops; its writer closes when it stops.
    """
    if handler._reader_task is None:
        # Not started yet: the client is still connecting.
        return False
    waiter = handler._disconnect_waiter
    closed = getattr(handler.writer, "is_closed", False)
    return waiter is None or waiter.done() or handler.writer is None or closed


class _StreamWriter(StreamWriterAdapter):  # type: ignore[misc]
    """amqtt's writer of a TCP connection, closing one the client reset.

    amqtt 0.12.1 closes a connection by sending what it holds and then a FIN.
    To a client that had already gone, such as one refused for a CONNECT of
    MQTT 5 or another protocol level that hung up meanwhile, the FIN failed
    with ``OSError`` (ENOTCONN, or a reset while draining), which ended the
    connection's task: asyncio logged "Unhandled exception in
    client_connected_cb" at ERROR. This class can go when amqtt's
    ``StreamWriterAdapter.close`` expects a connection to be gone.
    """

    async def close(self) -> None:
        """Close as amqtt does, or drop the connection if the client is gone."""
        try:
            await super().close()
        except OSError as exc:
            logger.debug("MQTT connection gone before its close: %s", exc)
            self._writer.transport.abort()


class _BadSubscribe(ValueError):
    """A SUBSCRIBE for which the broker closes the connection."""


class _SubscribePayload(SubscribePayload):  # type: ignore[misc]
    """A SUBSCRIBE's filters, read at once and checked as MQTT 3.1.1 requires.

    amqtt 0.12.1 reads a SUBSCRIBE's payload with three awaited reads per
    filter: one SUBSCRIBE of 2,000 filters took 8 ms of the broker's loop.
    This reads the payload in one read, and stops at the first filter past
    ``MAX_FILTERS_PER_SUBSCRIBE`` (0.1 ms).

    amqtt also granted a requested QoS byte of 3 to 255 and a filter holding
    NUL, and turned bytes that are not UTF-8 into the text ``b'...'``. MQTT
    3.1.1 has the server close the connection for each, rather than refuse the
    filter with 0x80: a QoS byte other than 0, 1 or 2 [MQTT-3.8.3-4], NUL
    [MQTT-1.5.3-2], ill-formed UTF-8 [MQTT-1.5.3-1], an empty filter
    [MQTT-4.7.3-1], no filter at all [MQTT-3.8.3-3]. ``from_stream`` raises
    ``_BadSubscribe`` for them and for too many filters; amqtt's reader then
    ends the connection as if the client had dropped it (its will is
    published). This class can go when amqtt reads a packet at once and
    checks its filters, and limits their number.
    """

    @classmethod
    async def from_stream(
        cls, reader: Any, fixed_header: Any, variable_header: Any
    ) -> _SubscribePayload:
        """Read the payload that follows the packet identifier.

        Raises:
            _BadSubscribe: the payload breaks MQTT 3.1.1 or has too many filters.
        """
        length = fixed_header.remaining_length - variable_header.bytes_length
        data = bytes(await read_or_raise(reader, length)) if length > 0 else b""
        return cls(_subscribe_filters(data))


class _SubscribePacket(SubscribePacket):  # type: ignore[misc]
    """amqtt's SUBSCRIBE, with the payload of ``_SubscribePayload``."""

    PAYLOAD = _SubscribePayload


def _subscribe_filters(data: bytes) -> list[tuple[str, int]]:
    """The topic filters and requested QoS bytes of a SUBSCRIBE's payload.

    Raises:
        _BadSubscribe: the payload breaks MQTT 3.1.1 or has too many filters.
    """
    topics: list[tuple[str, int]] = []
    pos = 0
    while pos < len(data):
        if len(topics) == MAX_FILTERS_PER_SUBSCRIBE:
            raise _BadSubscribe(
                f"more than {MAX_FILTERS_PER_SUBSCRIBE} filters in a SUBSCRIBE"
            )
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        if end >= len(data):
            raise _BadSubscribe("a SUBSCRIBE cut short")
        try:
            topic_filter = data[pos + 2 : end].decode()
        except UnicodeDecodeError as exc:
            raise _BadSubscribe("a topic filter that is not UTF-8") from exc
        # Two bits of QoS and six reserved bits, which must be zero.
        qos = data[end]
        if qos > 2:
            raise _BadSubscribe(f"requested QoS byte {qos:#04x}")
        if not topic_filter or "\x00" in topic_filter:
            raise _BadSubscribe(f"the topic filter {topic_filter!r}")
        topics.append((topic_filter, qos))
        pos = end + 1
    if not topics:
        raise _BadSubscribe("a SUBSCRIBE without a topic filter")
    return topics


def broker_config(
    host: str,
    port: int,
    ws_port: int,
    password: str,
    data_dir: Path | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """The amqtt configuration of the embedded broker.

    With ``data_dir``, persistent sessions (clean session off), their
    subscriptions and retained messages are kept in a SQLite file there and
    restored when the broker starts again.
    """
    plugins: dict[str, Any] = {
        f"{__name__}.PublisherLogin": {"password": password},
        f"{__name__}.TopicRules": {"prefix": prefix},
    }
    if data_dir is not None:
        plugins["amqtt.contrib.persistence.SessionDBPlugin"] = {
            "connection": f"sqlite+aiosqlite:///{data_dir.resolve() / 'broker.db'}",
            "clear_on_shutdown": False,
        }
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}"},
            "ws": {"type": "ws", "bind": f"{host}:{ws_port}"},
        },
        "plugins": plugins,
    }


async def run_broker(
    host: str,
    port: int,
    ws_port: int,
    password: str,
    *,
    ready: Callable[[], None],
    stop: asyncio.Event,
    data_dir: Path | None = None,
    prefix: str = "",
) -> None:
    """Serve MQTT on ``port`` and MQTT over WebSocket on ``ws_port`` until ``stop``.

    ``ready`` is called once both listeners accept connections.

    Raises:
        BrokerError: a listener could not be opened, such as a port in use.
    """
    _configure_library_logging()
    # amqtt finds a packet's class in this table; a SUBSCRIBE is read with ours.
    amqtt.mqtt.packet_dict[SUBSCRIBE] = _SubscribePacket
    broker = _Broker(broker_config(host, port, ws_port, password, data_dir, prefix))
    # amqtt logs a failed start with a traceback at ERROR; the gateway says
    # instead, in one line, which port failed and which flag moves it.
    amqtt_logger = logging.getLogger("amqtt.broker")
    amqtt_logger.disabled = True
    try:
        await broker.start()
    except Exception as exc:
        raise BrokerError(_start_failure(exc, broker, port, ws_port)) from exc
    finally:
        amqtt_logger.disabled = False
    logger.info(
        "embedded MQTT broker on mqtt://%s:%d and ws://%s:%d", host, port, host, ws_port
    )
    ready()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def _start_failure(exc: BaseException, broker: Any, port: int, ws_port: int) -> str:
    """Say which port could not be opened and which flag moves it."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return f"the embedded MQTT broker failed to start: {exc}"
    # amqtt opens its listeners in order and keeps each one it opened; the
    # first one missing failed. The error's text, whose form depends on the
    # event loop, does not say so reliably.
    if "default" in broker._servers:
        what, number, flag = "MQTT WebSocket port", ws_port, "--mqtt-ws-port"
    else:
        what, number, flag = "MQTT port", port, "--mqtt-port"
    if cause.errno == errno.EADDRNOTAVAIL:
        flag = "--host"
    reason = os.strerror(cause.errno) if cause.errno else str(cause)
    return f"{what} {number}: {reason} (change {flag})"


class _ClientMistakesAtDebug(logging.Filter):
    """Turn into DEBUG what amqtt and websockets log louder about a client's doing.

    amqtt logs at ERROR a client that connects and leaves before its CONNECT
    ("No data from"), and at WARNING one that sends a bad first packet, a
    second CONNECT, a reserved packet, an acknowledgement for a packet it was
    never sent, or that reconnects too fast; websockets logs at ERROR, with a
    traceback, an opening handshake that a client broke off or got wrong.
    amqtt also logs at ERROR, with a traceback, a broadcast that failed
    because its subscriber did not acknowledge it in time, as happens when the
    subscriber leaves meanwhile. Anyone may cause these as often as they like,
    and none is for the operator to fix. Other records carrying a traceback
    from amqtt (a crashed task: a bug) keep their level, as do its messages
    about the broker as a whole.
    """

    #: How amqtt's broker starts its messages about one client's doing.
    BROKER_MESSAGES = (
        "No data from",
        "Failed to initialize client session",
        "[MQTT-",
        "Invalid connection from",
        "Error while handling client session",
        "Remote info could not be retrieved",
        "Client ",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote a record about one client; keep it only if DEBUG is on."""
        if record.levelno <= logging.DEBUG or not self._about_a_client(record):
            return True
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)

    def _about_a_client(self, record: logging.LogRecord) -> bool:
        if record.name == "websockets.server":
            error = record.exc_info[1] if record.exc_info else None
            return record.msg == "opening handshake failed" and isinstance(
                error, InvalidHandshake | EOFError | OSError
            )
        if record.exc_info:
            return _is_unacknowledged(record.exc_info[1])
        if record.name == "amqtt.mqtt.protocol.handler":
            # This logger speaks of one connection's packets only.
            return True
        message = record.getMessage()
        return message.startswith(self.BROKER_MESSAGES) or "not allowed to" in message


def _is_unacknowledged(error: BaseException | None) -> bool:
    """Whether amqtt gave up a delivery that its client did not acknowledge."""
    # amqtt raises a bare TimeoutError saying which acknowledgement it missed.
    return isinstance(error, TimeoutError) and str(error).startswith(
        (
            "Timeout waiting for PUBACK",
            "Timeout waiting for PUBREC",
            "Timeout waiting for PUBCOMP",
        )
    )


def _configure_library_logging() -> None:
    """Set how amqtt and the libraries under it log, in the broker's process.

    The broker's process is an entry point of its own, so it may set these
    loggers' levels and filters; nothing else in the gateway does.
    """
    # They log every connection and state change at INFO; the log keeps their
    # warnings and errors, those about one client's doing at DEBUG.
    level = max(logging.WARNING, logging.getLogger().getEffectiveLevel())
    for name in ("amqtt", "transitions", "websockets", "aiosqlite", "sqlalchemy"):
        logging.getLogger(name).setLevel(level)
    # A filter acts only on its own logger's records, not its children's.
    for name in ("amqtt.broker", "amqtt.mqtt.protocol.handler", "websockets.server"):
        library_logger = logging.getLogger(name)
        if not any(
            isinstance(f, _ClientMistakesAtDebug) for f in library_logger.filters
        ):
            library_logger.addFilter(_ClientMistakesAtDebug())


class EmbeddedBroker:
    """The gateway's side of a broker running in a child process.

    The child runs ``gateway broker``; its standard input is a pipe it reads to
    its end, so it stops when the gateway closes the pipe, and also when the
    gateway dies without closing it (the kernel closes it then). It runs in a
    session of its own so that a Ctrl-C meant for the gateway does not stop the
    broker before the gateway has published what it still holds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ws_port: int,
        password: str,
        data_dir: str | None = None,
        prefix: str = "",
    ) -> None:
        """Describe the broker to start; nothing runs before ``start``."""
        self.host = host
        self.port = port
        self.ws_port = ws_port
        self.data_dir = data_dir
        self.prefix = prefix
        self._password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches the broker."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def url(self) -> str:
        """The broker URL with which the gateway logs in to publish."""
        password = quote(self._password, safe="")
        return f"mqtt://{PUBLISHER}:{password}@{self.connect_host}:{self.port}"

    def start(self) -> None:
        """Start the child and wait until it listens.

        Raises:
            BrokerError: the child exited or did not get ready in time; the
                message carries its reason, such as a port in use.
        """
        env = dict(os.environ)
        env["GATEWAY_API_KEY"] = self._password
        command = [
            sys.executable,
            "-m",
            "gateway",
            "broker",
            "--host",
            self.host,
            "--mqtt-port",
            str(self.port),
            "--mqtt-ws-port",
            str(self.ws_port),
            "--until-stdin-closes",
        ]
        if self.data_dir:
            command += ["--mqtt-data-dir", self.data_dir]
        if self.prefix:
            command += ["--mqtt-prefix", self.prefix]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._process = process
        assert process.stdout is not None
        line = _read_line(process.stdout, _START_TIMEOUT)
        if line.strip() == _READY_LINE:
            return
        self.stop()
        if process.returncode not in (None, 0):
            raise BrokerError(
                line.strip()
                or f"the embedded MQTT broker exited ({process.returncode})"
            )
        raise BrokerError(
            f"the embedded MQTT broker did not start within {_START_TIMEOUT:.0f} s"
        )

    def stop(self) -> None:
        """Close the child's input, wait for it to stop, kill it if it will not."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("embedded MQTT broker did not stop; killing it")
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _read_line(stream: IO[bytes], seconds: float) -> str:
    """One line from the child's standard output, or '' at its end or timeout."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                return stream.readline().decode("utf-8", "replace")
    return ""


def serve_broker(
    host: str,
    port: int,
    ws_port: int,
    password: str,
    *,
    until_stdin_closes: bool,
    data_dir: Path | None = None,
    prefix: str = "",
) -> None:
    """Run the broker in this process until SIGTERM, SIGINT or, if asked, stdin's end.

    On success the line ``broker ready`` goes to standard output; on failure the
    reason goes there instead, for the gateway that started the process to show.

    Raises:
        BrokerError: the broker could not start.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if until_stdin_closes:
            loop.add_reader(sys.stdin.fileno(), _on_stdin, stop)

        def ready() -> None:
            sys.stdout.write(f"{_READY_LINE}\n")
            sys.stdout.flush()

        await run_broker(
            host,
            port,
            ws_port,
            password,
            ready=ready,
            stop=stop,
            data_dir=data_dir,
            prefix=prefix,
        )

    try:
        if data_dir is not None:
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BrokerError(
                    f"cannot make the --mqtt-data-dir folder {data_dir}: {exc.strerror}"
                ) from None
        asyncio.run(main())
    except BrokerError as exc:
        sys.stdout.write(f"{exc}\n")
        sys.stdout.flush()
        raise


def _on_stdin(stop: asyncio.Event) -> None:
    # Anything written is ignored; the end of the pipe means the gateway is gone.
    if not os.read(sys.stdin.fileno(), 4096):
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        stop.set()
