"""uvicorn's HTTP protocol with a cap on request heads and a deadline for them.

uvicorn's httptools protocol keeps reading a request's line and headers for as long
as they come, in memory and without a deadline: one client streaming a header of
hundreds of megabytes grows the process by as much and stalls every other client
while the parser copies it, and a client that never ends its headers holds a socket
for ever (slowloris). This subclass counts the bytes of each request head and refuses
it with 431 past ``--max-header-bytes``, and refuses a head not complete within
``--header-timeout`` seconds of its first byte with 408, both with the gateway's JSON
error body. A malformed request gets that body too, and is logged at DEBUG: it is the
client's mistake.

It relies on uvicorn's ``HttpToolsProtocol`` callbacks (``data_received``,
``on_headers_complete``, ``on_message_complete``, ``send_400_response``), which
is why uvicorn is pinned to a minor version in ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GatewayHttpProtocol", "quiet_bad_requests"]

logger = logging.getLogger(__name__)

#: Seconds a refused client's further bytes are read and dropped before the
#: connection closes: closing with unread bytes would reset it, and the client
#: could lose the answer that says what was wrong.
_LINGER = 2.0

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
}


class GatewayHttpProtocol(HttpToolsProtocol):
    """One HTTP connection, with its request heads bounded in size and time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.app_state["gateway"].settings
        self._max_head = settings.max_header_bytes
        self._head_timeout = settings.header_timeout
        # Bytes received since the current request head began, and whether one
        # is being received: from the first byte after the previous request
        # until its headers are complete.
        self._head_bytes = 0
        self._in_head = True
        # The last bytes of the head so far, to find its end when the blank
        # line that ends it is split between two chunks.
        self._head_tail = b""
        # Fires when a head takes longer than the deadline.
        self._head_timer: asyncio.TimerHandle | None = None
        # Set once a request was refused: what arrives after is dropped unread.
        self._refused = False

    def data_received(self, data: bytes) -> None:
        """Feed the parser; refuse a head once it is too large."""
        if self._refused:
            return
        if self._in_head:
            if self._head_bytes == 0:
                self._head_timer = self.loop.call_later(
                    self._head_timeout, self._head_too_slow
                )
            # Checked before feeding, and whether or not this chunk ends the
            # head: a whole head over the limit in one chunk must not reach
            # the application, nor the WebSocket endpoint, which would refuse
            # it with a less helpful status. The body after the head's end
            # is not held against the head.
            end = self._head_end(data)
            self._head_bytes += len(data) if end is None else end
            self._head_tail = (self._head_tail + data[-3:])[-3:]
            if self._head_bytes > self._max_head:
                logger.debug(
                    "request head from %s over %d bytes: refused",
                    self.client,
                    self._max_head,
                )
                self._refuse(
                    431,
                    "too_large",
                    "request line and headers over the limit of "
                    f"{self._max_head} bytes",
                )
                return
        super().data_received(data)

    def _head_end(self, data: bytes) -> int | None:
        """How many bytes of ``data`` belong to the head, if it ends in ``data``.

        The head ends at its first blank line, which llhttp also accepts
        without carriage returns.
        """
        tail = self._head_tail
        # The blank line may begin in the previous chunk.
        seam = tail + data[:3]
        ends = []
        for blank in (b"\r\n\r\n", b"\n\n"):
            found = seam.find(blank)
            if found >= 0 and found + len(blank) > len(tail):
                ends.append(found + len(blank) - len(tail))
                continue
            found = data.find(blank)
            if found >= 0:
                ends.append(found + len(blank))
        return min(ends) if ends else None

    def on_headers_complete(self) -> None:
        """The head is whole: stop counting and cancel its deadline."""
        self._in_head = False
        self._cancel_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The next bytes start a new request head."""
        self._in_head = True
        self._head_bytes = 0
        self._head_tail = b""
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel the head's deadline with the connection."""
        self._cancel_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Answer a malformed request with the gateway's JSON error body."""
        logger.debug("malformed HTTP request from %s: %s", self.client, msg)
        self._refuse(400, "bad_http", msg)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            logger.debug("request head from %s not complete in time", self.client)
            self._refuse(
                408,
                "header_timeout",
                f"request line and headers not received within "
                f"{self._head_timeout:g} s",
            )

    def _cancel_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer with a JSON error and end the connection.

        The answer is followed by a half-close, so the client reads it to its
        end; the rest of what the client sends is dropped unparsed for a short
        while, then the connection closes.
        """
        self._cancel_timer()
        self._in_head = False
        self._refused = True
        transport = self.transport
        if transport.is_closing():
            return
        body = orjson.dumps({"error": {"code": code, "message": message}})
        head = b"HTTP/1.1 %d %b\r\n" % (status, _REASONS[status])
        head += b"content-type: application/json\r\n"
        head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        transport.write(head + body)
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(_LINGER, transport.close)
        else:
            transport.close()


#: uvicorn's WARNINGs that a client alone causes: a malformed request, and an
#: upgrade to another protocol than WebSocket (such as h2c), which is answered
#: as a plain HTTP request.
_CLIENT_MISTAKES = ("Invalid HTTP request", "Unsupported upgrade request")


class _QuietBadRequests(logging.Filter):
    """Drops uvicorn's WARNINGs for client mistakes.

    A malformed request is the client's mistake, which the gateway logs at DEBUG
    (``GatewayHttpProtocol.send_400_response``); at WARNING, any client could
    flood the log. uvicorn logs these before the gateway sees them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith(
            _CLIENT_MISTAKES
        ):
            return False
        return True


def quiet_bad_requests() -> None:
    """Install the filter on uvicorn's error logger (once, at start)."""
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietBadRequests) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(_QuietBadRequests())
