"""The benchmark's publishers: how an event body reaches each server.

Both publishers send the body of one ``POST /events`` (an event object) and wait
for the server's answer, which both servers give only after the event was written
to every subscriber's socket. So one publisher has one event in flight, and the
benchmark paces both servers the same way.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from clients._wire import BenchError, Tally, WebSocketClient, open_client

__all__ = ["HttpPublisher", "Publisher", "WebSocketPublisher"]

_MAX_HEAD = 16 * 1024


class Publisher(Protocol):
    """One publishing connection, used by one task at a time."""

    async def publish(self, body: bytes) -> None:
        """Send one publish body and wait until the server accepted it."""

    def close(self) -> None:
        """Drop the connection."""


class HttpPublisher:
    """``POST /events`` to the gateway over one keep-alive HTTP/1.1 connection.

    The gateway closes a keep-alive connection that stayed idle for a few
    seconds (uvicorn's keep-alive timeout), as it may while the subscribers
    connect; the publisher then opens a new one before its next request.
    """

    def __init__(
        self, host: str, port: int, api_key: str, *, request_timeout: float
    ) -> None:
        """Prepare the requests; nothing is connected until the first one.

        Args:
            host: the gateway's address.
            port: its port.
            api_key: the bearer key of ``POST /events``.
            request_timeout: seconds allowed to connect and, separately, to
                receive each whole response.
        """
        self._address = (host, port)
        self._timeout = request_timeout
        # The request line and the headers that never change, up to the
        # Content-Length value.
        self._head = (
            "POST /events HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            f"Authorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(
        cls, host: str, port: int, api_key: str, *, request_timeout: float
    ) -> HttpPublisher:
        """Connect; ``request_timeout`` (seconds) bounds this and every request."""
        publisher = cls(host, port, api_key, request_timeout=request_timeout)
        await publisher._connect()
        return publisher

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.close()
        async with asyncio.timeout(self._timeout):
            self._reader, self._writer = await asyncio.open_connection(*self._address)
        return self._reader, self._writer

    async def publish(self, body: bytes) -> None:
        """Send one request and read its whole response.

        Raises:
            BenchError: the gateway answered with a status other than 200.
            TimeoutError: no complete answer within the timeout.
            asyncio.IncompleteReadError: the gateway hung up mid-response.
        """
        reader, writer = self._reader, self._writer
        if reader is None or writer is None or reader.at_eof():
            reader, writer = await self._connect()
        writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        async with asyncio.timeout(self._timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            answer = await reader.readexactly(_content_length(head))
        if not head.startswith(b"HTTP/1.1 200"):
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            reason = answer[:200].decode("utf-8", "replace")
            raise BenchError(f"publish refused: {status} {reason}")

    def close(self) -> None:
        """Close the connection without waiting."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _content_length(head: bytes) -> int:
    if len(head) > _MAX_HEAD:
        raise BenchError("response head too long")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise BenchError("the gateway answered without a Content-Length")


class WebSocketPublisher:
    """Publish messages on the baseline server's ``/publish`` WebSocket."""

    def __init__(self, client: WebSocketClient, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, *, request_timeout: float
    ) -> WebSocketPublisher:
        """Connect; ``request_timeout`` (seconds) bounds this and every publish."""
        client = await open_client(
            host, port, path, Tally(), handshake_timeout=request_timeout
        )
        return cls(client, request_timeout)

    async def publish(self, body: bytes) -> None:
        """Send one body as a text message and wait for the server's reply.

        Raises:
            BenchError: the reply is not an acknowledgement.
            TimeoutError: no reply within the timeout.
        """
        self._client.send_text(body)
        async with asyncio.timeout(self._timeout):
            reply = await self._client.messages.get()
        if not isinstance(reply, dict) or "events" not in reply:
            raise BenchError(f"publish refused: {reply!r}"[:300])

    def close(self) -> None:
        """Drop the connection."""
        self._client.abort()
