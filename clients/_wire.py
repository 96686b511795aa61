"""A minimal WebSocket client for load generation: upgrade, frame parsing, tallies.

Every server in the benchmark is measured through this one client, so that what the
client costs per message is the same whichever server sends it. It implements only
what a client needs from RFC 6455: the opening handshake, parsing of the frames a
server sends (never masked), masked frames of its own, answers to pings and to the
closing handshake. Event messages go to a tally shared by every subscriber; any
other text message goes to the connection's queue.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from array import array
from collections import Counter
from typing import Any, cast

import orjson

__all__ = [
    "BenchError",
    "Tally",
    "WebSocketClient",
    "open_client",
]

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: How every event message starts, with both servers (orjson keeps key order).
EVENT_PREFIX = b'{"type":"event"'
#: The key of the publisher's timestamp inside ``eventDetails``; the publisher
#: puts another key after it, so a comma always ends the number.
SENT_AT_KEY = b'"sentAt":'
#: The key of the event's number in its phase, right after the timestamp and
#: followed by one more key.
SEQ_KEY = b'"seq":'
_MAX_RESPONSE_HEAD = 16 * 1024

_OP_CONT = 0x0
_OP_TEXT = 0x1
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA

CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006


class BenchError(Exception):
    """The benchmark cannot go on: a server refused, failed or timed out."""


class Tally:
    """Event messages received by every subscriber during one phase.

    Latencies are in seconds from the publisher's ``sentAt`` (a ``perf_counter``
    reading of this same process) to the moment the frame was read. A subscriber
    that reads the same ``seq`` twice in one phase counts a duplicate.
    """

    def __init__(self) -> None:
        # Bumped by every reset, so that each subscriber knows when to forget
        # the sequence numbers it saw in the previous phase.
        self.phase = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far (at the start of a phase)."""
        self.phase += 1
        self.received = 0
        self.duplicates = 0
        self.last_at = 0.0
        self.latencies = array("d")
        # Close codes of connections the server ended, 1006 for a lost socket.
        self.closes: Counter[int] = Counter()
        # MQTT only: deliveries the broker marked DUP (sent again at QoS 1), and
        # retained messages, sent on subscribing and never counted as received.
        self.marked_dup = 0
        self.retained = 0

    @property
    def unique(self) -> int:
        """Deliveries counted once per subscriber and event."""
        return self.received - self.duplicates

    def record(self, payload: bytes, now: float, seen: set[int]) -> None:
        """Count one event message read at ``now`` and keep its latency.

        Args:
            payload: the message.
            now: when it was read, from ``time.perf_counter``.
            seen: the sequence numbers the receiving subscriber has read in
                this phase; the message's own is added.
        """
        self.received += 1
        self.last_at = now
        at = payload.find(SENT_AT_KEY)
        if at < 0:
            return
        start = at + len(SENT_AT_KEY)
        end = payload.find(b",", start)
        self.latencies.append(now - float(payload[start:end]))
        # The publisher puts the sequence number right after the timestamp.
        if payload.startswith(SEQ_KEY, end + 1):
            start = end + 1 + len(SEQ_KEY)
            seq = int(payload[start : payload.find(b",", start)])
            if seq in seen:
                self.duplicates += 1
            else:
                seen.add(seq)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value a server must answer to ``key``."""
    digest = hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one final frame as a client must: masked with a random key."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    mask = os.urandom(4)
    # XOR the whole payload at once as one big integer: far cheaper in Python
    # than a loop over bytes, and the payloads here are small.
    key = (mask * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return header + mask + masked.to_bytes(length, "big")


class WebSocketClient(asyncio.Protocol):
    """One client connection: the HTTP upgrade, then frames until the socket ends.

    ``data_received`` is the hot path of the whole load generator. It takes one
    clock reading per read from the socket, walks every complete frame in it and
    leaves a partial one in a buffer for the next read.
    """

    def __init__(self, host: str, port: int, path: str, tally: Tally) -> None:
        self.host = host
        self.port = port
        self.path = path
        # Shared with every subscriber of the run; reset between phases.
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        # Resolved by the 101 response; failed if the server refuses or hangs up.
        self.opened: asyncio.Future[None] = loop.create_future()
        # Resolved with the close code once the socket is gone.
        self.closed: asyncio.Future[int] = loop.create_future()
        # Text messages that are not events (welcome, replies), decoded.
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._upgraded = False
        # Bytes read but not parsed yet: the response head, or a partial frame.
        self._buffer = b""
        # Payloads of a fragmented message, None when none is under way.
        self._fragments: list[bytes] | None = None
        # True once this side started closing, so the end is not counted as
        # the server's doing.
        self._leaving = False
        self._close_code = CLOSE_ABNORMAL
        # Sequence numbers of the events read in the tally's current phase.
        self._seen: set[int] = set()
        self._seen_phase = tally.phase

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        request = (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "\r\n"
        )
        self.transport.write(request.encode())

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            self._parse(data, time.perf_counter())
        else:
            self._handshake(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(
                BenchError(f"connection lost before the upgrade: {exc}")
            )
        if not self.closed.done():
            self.closed.set_result(self._close_code)
            if not self._leaving:
                self.tally.closes[self._close_code] += 1

    # Sending

    def send_text(self, text: bytes) -> None:
        """Send one text message (UTF-8 bytes)."""
        self._send(_OP_TEXT, text)

    def send_json(self, message: Any) -> None:
        """Send one JSON text message."""
        self._send(_OP_TEXT, orjson.dumps(message))

    def _send(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(client_frame(opcode, payload))

    def abort(self) -> None:
        """Drop the connection at once, as this side's choice (end of a run)."""
        self._leaving = True
        if self.transport is not None:
            self.transport.abort()

    # Receiving

    def _handshake(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_RESPONSE_HEAD:
                self._fail("response head too long")
            return
        head = self._buffer[:end].decode("latin-1")
        rest = self._buffer[end + 4 :]
        self._buffer = b""
        status, *lines = head.split("\r\n")
        if not status.startswith("HTTP/1.1 101"):
            self._fail(f"upgrade refused: {status!r}")
            return
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != accept_key(self._key):
            self._fail("wrong Sec-WebSocket-Accept in the upgrade response")
            return
        self._upgraded = True
        self.opened.set_result(None)
        if rest:
            self._parse(rest, time.perf_counter())

    def _parse(self, data: bytes, now: float) -> None:
        """Handle every complete frame in the buffer and ``data``."""
        if self._buffer:
            data = self._buffer + data
        size = len(data)
        pos = 0
        while size - pos >= 2:
            second = data[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            if second & 0x80:
                self._fail("the server sent a masked frame")
                return
            end = start + length
            if end > size:
                break
            self._on_frame(data[pos], data[start:end], now)
            pos = end
        self._buffer = data[pos:] if pos < size else b""

    def _on_frame(self, first: int, payload: bytes, now: float) -> None:
        opcode = first & 0x0F
        final = first & 0x80
        # The common case first: a whole text message in one frame.
        if opcode == _OP_TEXT and final and self._fragments is None:
            self._on_text(payload, now)
        elif opcode == _OP_PING:
            self._send(_OP_PONG, payload)
        elif opcode == _OP_CLOSE:
            self._on_close(payload)
        elif opcode == _OP_PONG:
            return
        elif opcode == _OP_CONT and self._fragments is not None:
            self._fragments.append(payload)
            if final:
                whole = b"".join(self._fragments)
                self._fragments = None
                self._on_text(whole, now)
        elif opcode == _OP_TEXT and not final:
            self._fragments = [payload]
        else:
            self._fail(f"unexpected frame, opcode {opcode}")

    def _on_text(self, payload: bytes, now: float) -> None:
        if payload.startswith(EVENT_PREFIX):
            tally = self.tally
            if self._seen_phase != tally.phase:
                self._seen = set()
                self._seen_phase = tally.phase
            tally.record(payload, now, self._seen)
        else:
            self.messages.put_nowait(orjson.loads(payload))

    def _on_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
        self._close_code = code or CLOSE_NO_STATUS
        # Echo the code to finish the closing handshake, then close the socket
        # once the echo is written; no more frames matter after a close.
        self._send(_OP_CLOSE, payload[:2])
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(BenchError(reason))
        if self.transport is not None:
            self.transport.abort()


async def open_client(
    host: str, port: int, path: str, tally: Tally, *, handshake_timeout: float
) -> WebSocketClient:
    """Connect and finish the upgrade within ``handshake_timeout`` seconds.

    Raises:
        BenchError: the server refused the upgrade or answered wrongly.
        OSError: the TCP connection failed.
        TimeoutError: the upgrade took too long.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(handshake_timeout):
        _, protocol = await loop.create_connection(
            lambda: WebSocketClient(host, port, path, tally), host, port
        )
        try:
            await protocol.opened
        except BaseException:
            protocol.abort()
            raise
    return protocol
