"""A minimal MQTT 3.1.1 subscriber for load generation: packets, tallies, keepalive.

The MQTT counterpart of ``clients._wire``: written for the benchmark from the MQTT
3.1.1 specification (OASIS standard, 2014), with only what a subscriber needs.
It connects with a clean session, subscribes, reads PUBLISH packets at QoS 0 and
QoS 1 (acknowledging the latter with PUBACK), and sends PINGREQ within the keep
alive interval. The gateway publishes an event's encoded envelope as the MQTT
payload, the same bytes as the text of its WebSocket frame, so event payloads go
to the same ``Tally`` as the WebSocket client's and cost the same to count.

A PUBLISH with the RETAIN flag set was stored by the broker before this client
subscribed: it is counted apart and never in the tally, since it is not a delivery
of the phase under way.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import cast

from clients._wire import CLOSE_ABNORMAL, EVENT_PREFIX, BenchError, Tally

__all__ = [
    "CONNACK_CODES",
    "MqttClient",
    "connect_packet",
    "decode_length",
    "encode_length",
    "encode_string",
    "open_mqtt_client",
    "publish_packet",
    "subscribe_packet",
]

# Control packet types, the high nibble of a packet's first byte.
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

#: What a CONNACK's return code means when it is not 0 (accepted).
CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
#: The SUBACK return code of a refused subscription.
SUBACK_FAILURE = 0x80
#: The largest Remaining Length the four bytes of its encoding can hold.
MAX_REMAINING_LENGTH = 268_435_455

_PINGREQ = bytes([PINGREQ << 4, 0])
_DISCONNECT = bytes([DISCONNECT << 4, 0])
_PUBACK_HEAD = bytes([PUBACK << 4, 2])
# Client identifiers: unique per process run, so that a broker never takes a new
# subscriber for an older one and disconnects that.
_client_ids = itertools.count(1)


# Encoding


def encode_length(length: int) -> bytes:
    """The Remaining Length field: seven bits a byte, least significant first.

    Raises:
        ValueError: ``length`` is negative or above ``MAX_REMAINING_LENGTH``.
    """
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_length(data: bytes, pos: int) -> tuple[int, int]:
    """Read the Remaining Length of the packet whose first byte is at ``pos``.

    Returns:
        The length and the index of the first byte after the fixed header, or
        ``(-1, -1)`` when ``data`` ends inside the field.

    Raises:
        ValueError: the field runs over four bytes.
    """
    length = 0
    at = pos + 1
    for shift in (0, 7, 14, 21):
        if at >= len(data):
            return -1, -1
        byte = data[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length, at
    raise ValueError("remaining length longer than four bytes")


def encode_string(text: str | bytes) -> bytes:
    """A UTF-8 string field: two bytes of length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 0xFFFF:
        raise ValueError("string field longer than 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT with a clean session and no will; ``keepalive`` in seconds."""
    flags = 0x02
    payload = encode_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += encode_string(username)
        if password is not None:
            flags |= 0x40
            payload += encode_string(password)
    header = encode_string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    return _packet(CONNECT << 4, header + payload)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """SUBSCRIBE to one filter at most at ``qos``; its fixed-header flags are 0010."""
    body = packet_id.to_bytes(2, "big") + encode_string(topic_filter) + bytes([qos])
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def publish_packet(topic: str, payload: bytes, *, retain: bool = False) -> bytes:
    """PUBLISH at QoS 0, which has no packet identifier."""
    return _packet(PUBLISH << 4 | int(retain), encode_string(topic) + payload)


# The protocol


class MqttClient(asyncio.Protocol):
    """One subscriber connection: CONNECT, then packets until the socket ends.

    ``data_received`` is the hot path, as in ``clients._wire.WebSocketClient``:
    one clock reading per read from the socket, every complete packet in it
    handled, a partial one kept for the next read. The PUBACKs owed for one
    read go out together in one write once the read is handled.
    """

    def __init__(
        self,
        tally: Tally,
        *,
        keepalive: int,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        """Prepare the connection; CONNECT goes out once the socket is open.

        Args:
            tally: where event payloads are counted, shared with every other
                subscriber of the run and reset between phases.
            keepalive: seconds announced in CONNECT; a PINGREQ goes out every
                this many seconds, so the broker never waits one and a half
                of them without a packet.
            username: the user name to log in with; anonymous when None.
            password: its password, sent only with a user name.
        """
        self.tally = tally
        self.keepalive = keepalive
        self.client_id = f"fanout-bench-{os.getpid()}-{next(_client_ids)}"
        self._login = (username, password)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        # Resolved by a CONNACK that accepts; failed by one that refuses, or if
        # the socket ends first.
        self.opened: asyncio.Future[None] = loop.create_future()
        # Resolved with True once the socket is gone, whoever ended it.
        self.closed: asyncio.Future[bool] = loop.create_future()
        # SUBSCRIBE packet identifier to the future of its SUBACK return code.
        self._subscribing: dict[int, asyncio.Future[int]] = {}
        # Packet identifiers run from 1 to 65,535, then start again.
        self._packet_ids = itertools.count()
        # Bytes read but not handled yet: the start of a partial packet.
        self._buffer = b""
        # PUBACKs owed for the read being handled, written together at its end.
        self._acks: list[bytes] = []
        self._ping: asyncio.TimerHandle | None = None
        # True once this side started closing, so that the end is not counted
        # as the broker's doing.
        self._leaving = False
        # Sequence numbers of the events read in the tally's current phase.
        self._seen: set[int] = set()
        self._seen_phase = tally.phase

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        username, password = self._login
        self.transport.write(
            connect_packet(
                self.client_id,
                keepalive=self.keepalive,
                username=username,
                password=password,
            )
        )
        self._schedule_ping()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._buffer:
            data = self._buffer + data
        size = len(data)
        pos = 0
        while size - pos >= 2:
            # Most packets here are PUBLISH of a few hundred bytes: a
            # Remaining Length of one or two bytes.
            try:
                length, start = decode_length(data, pos)
            except ValueError as exc:
                self._fail(str(exc))
                return
            if start < 0:
                break
            end = start + length
            if end > size:
                break
            first = data[pos]
            if first >> 4 == PUBLISH:
                self._on_publish(first, data, start, end, now)
            else:
                self._on_control(first >> 4, data[start:end])
            pos = end
        self._buffer = data[pos:] if pos < size else b""
        if self._acks and self.transport is not None:
            self.transport.write(b"".join(self._acks))
            self._acks.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping is not None:
            self._ping.cancel()
        failure = BenchError(f"connection lost: {exc or 'closed by the broker'}")
        if not self.opened.done():
            self.opened.set_exception(failure)
        for waiter in self._subscribing.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if not self.closed.done():
            self.closed.set_result(True)
            if not self._leaving:
                # MQTT has no close codes: a broker that drops a subscriber
                # counts as the WebSocket client's lost socket does.
                self.tally.closes[CLOSE_ABNORMAL] += 1

    # Requests

    async def subscribe(self, topic_filter: str, qos: int) -> int:
        """Subscribe to one filter and wait for the SUBACK.

        Cancelling is safe: a SUBACK that arrives afterwards is ignored. Several
        tasks may subscribe at once, each under a packet identifier of its own.

        Returns:
            The QoS the broker granted.

        Raises:
            BenchError: the broker refused the subscription or hung up.
        """
        packet_id = next(self._packet_ids) % 0xFFFF + 1
        waiter = asyncio.get_running_loop().create_future()
        self._subscribing[packet_id] = waiter
        self._write(subscribe_packet(packet_id, topic_filter, qos))
        try:
            granted: int = await waiter
        finally:
            self._subscribing.pop(packet_id, None)
        if granted == SUBACK_FAILURE:
            raise BenchError(f"the broker refused a subscription to {topic_filter!r}")
        return granted

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 0; nothing tells whether the broker accepted it."""
        self._write(publish_packet(topic, payload, retain=retain))

    def disconnect(self) -> None:
        """Send DISCONNECT and close once it is written: a clean goodbye."""
        self._leaving = True
        self._write(_DISCONNECT)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, as this side's choice (end of a run)."""
        self._leaving = True
        if self.transport is not None:
            self.transport.abort()

    def _write(self, packet: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(packet)

    def _schedule_ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping = loop.call_later(self.keepalive, self._send_ping)

    def _send_ping(self) -> None:
        # Sent on a fixed clock rather than only after silence: cheaper than
        # tracking every write, and the broker minds only the gap between packets.
        self._write(_PINGREQ)
        self._schedule_ping()

    # Receiving

    def _on_publish(
        self, first: int, data: bytes, start: int, end: int, now: float
    ) -> None:
        """Handle the PUBLISH in ``data[start:end]``, its flags in ``first``."""
        body = start + 2 + (data[start] << 8 | data[start + 1])
        qos = (first >> 1) & 0x03
        if qos == 1:
            # Acknowledge even a retained or duplicate message: the broker
            # keeps it in flight until it is.
            self._acks.append(_PUBACK_HEAD + data[body : body + 2])
            body += 2
        elif qos:
            self._fail(f"a PUBLISH at QoS {qos}, above what was subscribed")
            return
        tally = self.tally
        if first & 0x08:
            tally.marked_dup += 1
        if first & 0x01:
            tally.retained += 1
            return
        payload = data[body:end]
        if payload.startswith(EVENT_PREFIX):
            if self._seen_phase != tally.phase:
                self._seen = set()
                self._seen_phase = tally.phase
            tally.record(payload, now, self._seen)

    def _on_control(self, kind: int, body: bytes) -> None:
        if kind == CONNACK:
            self._on_connack(body)
        elif kind == SUBACK:
            packet_id = int.from_bytes(body[:2], "big")
            waiter = self._subscribing.get(packet_id)
            if waiter is not None and not waiter.done() and len(body) >= 3:
                waiter.set_result(body[2])
        elif kind != PINGRESP:
            self._fail(f"unexpected packet of type {kind}")

    def _on_connack(self, body: bytes) -> None:
        code = body[1] if len(body) >= 2 else -1
        if code == 0:
            if not self.opened.done():
                self.opened.set_result(None)
            return
        reason = CONNACK_CODES.get(code, f"return code {code}")
        self._fail(f"the broker refused the connection: {reason}")

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(BenchError(reason))
        if self.transport is not None:
            self.transport.abort()


async def open_mqtt_client(
    host: str,
    port: int,
    tally: Tally,
    *,
    keepalive: int = 60,
    username: str | None = None,
    password: str | None = None,
    handshake_timeout: float,
) -> MqttClient:
    """Connect and wait for the CONNACK within ``handshake_timeout`` seconds.

    Raises:
        BenchError: the broker refused the connection or answered wrongly.
        OSError: the TCP connection failed.
        TimeoutError: no CONNACK in time.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(handshake_timeout):
        _, protocol = await loop.create_connection(
            lambda: MqttClient(
                tally, keepalive=keepalive, username=username, password=password
            ),
            host,
            port,
        )
        try:
            await protocol.opened
        except BaseException:
            protocol.abort()
            raise
    return protocol
