"""Cheap WebSocket clients that follow a topic and can resume it elsewhere.

Tests with hundreds of clients that must each see every event once use these:
a follower keeps only the offsets of the events it receives, answers pings and
the server's close, and notes the close code, so that the test can open a new
follower on another replica (or through a load balancer) from the last offset
seen.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from rawws import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    client_frame,
    parse_response,
    text,
    upgrade_request,
)
from support import timeout


class HandshakeRefused(ConnectionError):
    """The server answered the upgrade with a status other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upgrade refused with {status}")
        self.status = status


class Follower(asyncio.Protocol):
    """One WebSocket client that reads everything, keeping the event offsets."""

    def __init__(self, request: bytes, accept: str) -> None:
        self._request = request
        self._accept = accept
        # The handshake response read so far; None once it is complete.
        self._head: bytes | None = b""
        self._parser = FrameParser()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        #: The welcome message, once it has arrived.
        self.welcome: asyncio.Future[dict[str, object]] = loop.create_future()
        #: Done with the ``subscribed`` answer.
        self.subscribed: asyncio.Future[None] = loop.create_future()
        #: Done with the close code when the server's close frame arrives.
        self.closed: asyncio.Future[int | None] = loop.create_future()
        #: When the close frame arrived (monotonic clock).
        self.closed_at = 0.0
        #: Offsets of the events received, in arrival order.
        self.offsets: list[int] = []
        #: Text frames other than events, welcome and subscribed (errors, gaps).
        self.others: list[bytes] = []

    @property
    def replica(self) -> str:
        """The replica that sent the welcome message."""
        return str(self.welcome.result()["replica"])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, _, data = self._head.partition(b"\r\n\r\n")
            self._head = None
            response = parse_response(head)
            accepted = response.header("sec-websocket-accept") == self._accept
            if response.status != 101 or not accepted:
                _fail(self.welcome, HandshakeRefused(response.status))
                self.close()
                return
        for frame in self._parser.feed(data):
            self._on_frame(frame)

    def _on_frame(self, frame: Frame) -> None:
        assert self.transport is not None
        if frame.opcode == OP_PING:
            self.transport.write(client_frame(OP_PONG, frame.payload))
        elif frame.opcode == OP_CLOSE:
            self.closed_at = time.monotonic()
            self.transport.write(client_frame(OP_CLOSE, frame.payload[:2]))
            _settle(self.closed, frame.close_code)
        elif frame.opcode == OP_TEXT:
            payload = frame.payload
            if payload.startswith(b'{"type":"event"'):
                self.offsets.append(orjson.loads(payload)["offset"])
            elif payload.startswith(b'{"type":"welcome"'):
                _settle(self.welcome, orjson.loads(payload))
            elif payload.startswith(b'{"type":"subscribed"'):
                _settle(self.subscribed, None)
            else:
                self.others.append(payload)

    def subscribe(self, topic: str, after: int | None = None) -> None:
        """Send a subscribe operation, resuming after ``after`` when given."""
        message: dict[str, object] = {"op": "subscribe", "topics": [topic]}
        if after is not None:
            message["offsets"] = {topic: after}
        assert self.transport is not None
        self.transport.write(text(message))

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"connection lost: {exc}")
        for future in (self.welcome, self.subscribed, self.closed):
            _fail(future, error)

    def close(self) -> None:
        """Drop the connection at once."""
        if self.transport is not None:
            self.transport.abort()


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
        # Retrieved here so that an unawaited one does not warn.
        future.exception()


async def follow(port: int, topic: str, after: int | None = None) -> Follower:
    """Connect a follower to ``port`` and subscribe it to ``topic``.

    Args:
        port: where the gateway (or a load balancer) listens on loopback.
        topic: the topic to follow.
        after: resume after this offset; None follows live events only.

    Raises:
        HandshakeRefused: the upgrade got another status than 101.
        ConnectionError: the connection was refused or lost before subscribing.
    """
    loop = asyncio.get_running_loop()
    request, accept = upgrade_request("127.0.0.1", port)
    _, client = await loop.create_connection(
        lambda: Follower(request, accept), "127.0.0.1", port
    )
    try:
        async with asyncio.timeout(timeout(10)):
            await client.welcome
            client.subscribe(topic, after)
            await client.subscribed
    except BaseException:
        client.close()
        raise
    return client


async def follow_many(port: int, topic: str, count: int) -> list[Follower]:
    """``count`` followers of ``topic``, connected fifty at a time."""
    clients: list[Follower] = []
    for start in range(0, count, 50):
        batch = min(50, count - start)
        clients += await asyncio.gather(*(follow(port, topic) for _ in range(batch)))
    return clients
