"""The WebSocket endpoint ``/ws``, as a uvicorn protocol class.

uvicorn hands every upgrade request to this class instead of its own WebSocket
implementation. Frames are parsed by the websockets Sans-I/O core; the gateway's
JSON protocol runs in the protocol's callbacks, and delivery writes the frame that
was encoded once per event straight to each socket. That skips the per-subscriber
cost of an ASGI message, a coroutine and per-connection framing, which is what lets
one process push as fast as a bare ``websockets.broadcast`` server, and it keeps an
idle connection free of any task. Starlette still serves every HTTP route.

Close codes the gateway sends (``docs/protocol.md`` lists them for clients):

- 1000 normal closure, 1001 the replica is shutting down (reconnect elsewhere);
- 1007 a text message that is not UTF-8, 1008 too many messages per second,
  1009 a message over ``max_frame_bytes``, 1011 the gateway failed;
- 1013 the client read too slowly and its outbound buffer passed its cap
  (reconnect and resume from the last offset seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import orjson
from websockets import http11
from websockets.exceptions import ProtocolError, SecurityError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State as CoreState
from websockets.server import ServerProtocol

from gateway.errors import (
    ClientError,
    Forbidden,
    LimitExceeded,
    Unauthorized,
    Unavailable,
)
from gateway.events.envelope import Event
from gateway.state.base import ConnectionRecord
from gateway.transports.messages import (
    Authenticate,
    Ping,
    Subscribe,
    Unsubscribe,
    control_frame,
    error_frame,
    parse_operation,
    request_ref,
)

if TYPE_CHECKING:
    from gateway.runtime import Runtime
    from gateway.security.permissions import ReadRights
    from gateway.security.tokens import Grant

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_AGAIN_LATER",
    "WebSocketProtocol",
]

logger = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
#: The connection's token expired (docs/protocol.md).
CLOSE_TOKEN_EXPIRED = 4001

#: The path of the endpoint; other upgrade requests get 404.
PATH = "/ws"
#: Messages received but not handled yet before reading from the socket pauses.
_INBOX_HIGH = 8
#: Live events held for one topic while its history is replayed, before the
#: connection counts as too slow.
_HOLD_LIMIT = 10_000
_SERVER_HEADER = "notification-gateway"
_LINGER_ZERO = struct.pack("ii", 1, 0)
_RATE_REASON = "too many messages per second"
#: Bytes each continuation frame adds to its message's size, on top of its
#: payload: an empty fragment costs the gateway a frame to parse and a list
#: entry, so a message may not be spread over more than max_frame_bytes / 64
#: fragments, whatever their payload.
_FRAGMENT_COST = 64
#: Close codes counted under their own label; a client's own codes (3000-4999)
#: are counted as "other", so a client cannot make new metric series.
_KNOWN_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1013}
)


class _FrameText:
    """A frame in the core's DEBUG lines, shown without raising on any payload.

    websockets 15 raises from ``Frame.__str__`` on a text frame that is not
    UTF-8 and on a malformed close frame, both of which a client can send at
    will, so each such frame printed a logging traceback
    (python-websockets/websockets#1695, fixed by #1712, and #1770). Such a frame
    is shown by its opcode and size instead. This can go once the pinned
    websockets has both fixes.
    """

    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame

    def __str__(self) -> str:
        try:
            return str(self.frame)
        except (UnicodeDecodeError, ProtocolError):
            size = len(self.frame.data)
            return f"{self.frame.opcode.name} (malformed) [{size} bytes]"


class _QuietCore(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The Sans-I/O core's log, with its per-connection INFO lines moved to DEBUG.

    The core announces every opened connection at INFO; the gateway logs its own
    line with the connection id instead. A client's bad upgrade request comes
    with a traceback, dropped here: the gateway logs the mistake in one DEBUG
    line. The core's ERRORs (an unexpected exception in its parser or handshake)
    are bugs and keep their level. Frames are logged only when DEBUG is on, so
    wrapping them costs nothing otherwise.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level <= logging.INFO:
            level = logging.DEBUG
            kwargs.pop("exc_info", None)
        args = tuple(_FrameText(a) if isinstance(a, Frame) else a for a in args)
        super().log(level, msg, *args, **kwargs)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)


_core_logger = _QuietCore(logging.getLogger(__name__ + ".core"))


class _State(enum.IntEnum):
    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class WebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection, from the upgrade request to the socket's end.

    uvicorn creates it with its config and server state; the gateway's runtime
    comes from the application's lifespan state. Callbacks run on the event loop;
    the only task a connection owns is the one that handles its pending messages,
    and it exists only while there are some.
    """

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        runtime: Runtime = app_state["gateway"]
        settings = runtime.settings
        self.runtime = runtime
        self.loop = _loop or asyncio.get_running_loop()
        # uvicorn's set of open connections: at shutdown it calls shutdown() on
        # each member and waits for the set to empty.
        self._server_connections: set[Any] = server_state.connections
        _allow_heads_up_to(settings.max_header_bytes)
        # The Sans-I/O WebSocket core: parses frames, enforces the size limit on
        # whole messages (fragments included) and answers pings.
        self.conn = ServerProtocol(
            max_size=settings.max_frame_bytes,
            logger=_core_logger,
        )
        self.transport: asyncio.Transport | None = None
        self.state = _State.CONNECTING
        self.id = ""
        self.peer = ""
        self.opened_at = 0.0
        self.close_code = CLOSE_ABNORMAL
        self.close_reason = ""
        # Topic filters this connection holds, in the router and the backend.
        self.filters: set[str] = set()
        # The filters whose backend watch has completed, and only those: each
        # is unwatched once when it goes. A filter may be in self.filters
        # before its watch is done, and the backend counts watches of all
        # connections together, so an extra unwatch would stop another
        # connection's events.
        self._watched: set[str] = set()
        # Topic name to live events held back while that topic's history is
        # replayed; None when no replay is running (the common case).
        self._hold: dict[str, list[Event]] | None = None
        # Topic name to the last offset a finished replay sent, until a newer
        # live event of that topic arrives; None when there is none.
        self._replayed: dict[str, int] | None = None
        # Text messages waiting for the handler task, which runs only while
        # this is not empty; reading pauses while it is long.
        self._inbox: deque[str] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._reading_paused = False
        # Fragments of a message being received, whether it is text, and the
        # size it counts for against max_frame_bytes (payload plus
        # _FRAGMENT_COST per continuation frame).
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._fragment_is_text = False
        self._message_size = 0
        self._max_message = settings.max_frame_bytes
        # Token bucket for inbound messages: a burst of twice the rate, refilled
        # continuously.
        self._rate = settings.max_messages_per_second
        self._tokens = 2 * self._rate
        self._tokens_at = 0.0
        # Keepalive: one timer that either sends a ping or, if the previous one
        # went unanswered for a whole interval, aborts the dead connection.
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_unanswered = False
        # Aborts the transport if the peer never answers our close frame.
        self._close_timer: asyncio.TimerHandle | None = None
        self._max_buffer = settings.max_buffer_bytes
        # Set once the connection has left the router and the registry.
        self._detached = False
        # Set when the client passed the message rate: later messages are
        # ignored and the connection closes once the queued ones are handled.
        self._overrun = False
        # Set once an HTTP answer to a malformed upgrade request was written.
        self._refused = False
        # Cleared while the transport's buffer is above its high-water mark;
        # made on the first pause only, so idle connections do not carry one.
        self._writable: asyncio.Event | None = None
        # The verified token (None: anonymous), what it allows, and the timer
        # that closes the connection when it expires.
        self.grant: Grant | None = None
        self.rights: ReadRights | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        # The address this connection is counted under in the runtime's
        # connection limits, until it ends; None if it was never counted.
        self._counted_address: str | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._server_connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        for event in conn.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame) and self.state is _State.OPEN:
                self._on_frame(event)
        if self.state is _State.CONNECTING and conn.handshake_exc is not None:
            # The core only ends the stream here; answer with a status instead.
            if not self._refused:
                self._refuse_malformed_upgrade(conn.handshake_exc)
            return
        self._flush()
        if conn.parser_exc is not None and self.state is _State.OPEN:
            # The core refused the input (too big, bad framing, bad UTF-8 in a
            # close frame) and has already queued its close frame.
            sent = conn.close_sent
            self._note_close(
                sent.code if sent else CLOSE_ABNORMAL, str(conn.parser_exc)
            )
            logger.debug("connection %s: protocol error: %s", self.id, conn.parser_exc)
            self._closing()
        # The closing handshake is over: close the TCP connection once what is
        # queued has been written. After a protocol error the core discards
        # what the peer still sends until its end of stream or the close timer.
        finished = conn.close_sent is not None and conn.close_rcvd is not None
        if finished and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._server_connections.discard(self)
        if self._counted_address is not None:
            self.runtime.limits.release(self._counted_address)
            self._counted_address = None
        if self._writable is not None:
            self._writable.set()
        for timer in (self._ping_timer, self._close_timer, self._expiry_timer):
            if timer is not None:
                timer.cancel()
        if self.state in (_State.OPEN, _State.CLOSING):
            self._detach()
            duration = time.monotonic() - self.opened_at
            code = str(self.close_code) if self.close_code in _KNOWN_CODES else "other"
            self.runtime.metrics.closes.labels(code).inc()
            logger.info(
                "connection %s closed: code %d %s, %.1f s",
                self.id,
                self.close_code,
                self.close_reason or "-",
                duration,
                extra={"connection_id": self.id, "close_code": self.close_code},
            )
        self.state = _State.CLOSED

    def pause_writing(self) -> None:
        # Live events rely on the buffer cap checked on every write; only a
        # replay, which writes many events at once, waits for the buffer to drain.
        if self._writable is None:
            self._writable = asyncio.Event()
        self._writable.clear()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set()

    def shutdown(self) -> None:
        """Close for a replica shutdown (uvicorn calls it on SIGTERM)."""
        if self.state is _State.OPEN:
            self.close(CLOSE_GOING_AWAY, "server shutting down")
        elif self.state is _State.CONNECTING and self.transport is not None:
            self.transport.close()

    # Handshake

    def _handshake(self, request: Request) -> None:
        conn = self.conn
        path = request.path.partition("?")[0]
        if path != PATH:
            response = _json_refusal(
                conn, 404, "not_found", f"no WebSocket endpoint here; use {PATH}"
            )
        elif self.runtime.draining:
            response = _json_refusal(
                conn, 503, "draining", "server shutting down; reconnect elsewhere"
            )
        elif (refusal := self._admit(request)) is not None:
            response = refusal
        else:
            # No extensions are offered back: events are sent uncompressed so that
            # one encoded frame serves every subscriber (docs/protocol.md).
            response = conn.accept(request)
            if response.status_code != 101:
                # A malformed upgrade (a bad version or key): the core's answer,
                # with its reason in the gateway's JSON body instead of text.
                reason = response.body.decode(errors="replace").strip()
                reason = reason.removeprefix("Failed to open a WebSocket connection: ")
                self.runtime.metrics.refused_connections.labels("bad_handshake").inc()
                response = _json_refusal(
                    conn, response.status_code, "bad_handshake", reason
                )
        response.headers["Server"] = _SERVER_HEADER
        conn.send_response(response)
        if response.status_code != 101:
            logger.debug(
                "refused WebSocket upgrade from %s to %s: %d",
                self.peer,
                path,
                response.status_code,
            )
            self._flush()
            assert self.transport is not None
            self.transport.close()
            return
        self._open()

    def _admit(self, request: Request) -> Response | None:
        """Check limits and the client's token; a refusal to send, or None."""
        runtime = self.runtime
        # Each of these headers is read as one value: a request repeating one
        # is malformed, and must not pass the Origin check on its first copy.
        repeated = [
            name
            for name in ("Origin", "Authorization")
            if len(request.headers.get_all(name)) > 1
        ]
        if repeated:
            logger.debug("malformed upgrade request from %s: %s", self.peer, repeated)
            runtime.metrics.refused_connections.labels("bad_request").inc()
            return _json_refusal(
                self.conn, 400, "bad_request", f"more than one {repeated[0]} header"
            )
        address = self.peer.rpartition(":")[0]
        refusal = runtime.limits.check(address, request.headers.get("Origin"))
        if refusal is not None:
            runtime.metrics.refused_connections.labels(refusal.code).inc()
            logger.info(
                "refused WebSocket upgrade from %s: %s", self.peer, refusal.message
            )
            return _json_refusal(
                self.conn, refusal.status, refusal.code, refusal.message
            )
        self._counted_address = address
        access = runtime.access
        try:
            token = access.token_of(request.path, request.headers.get("Authorization"))
            self.grant = access.admit(token)
        except Unauthorized as exc:
            self.runtime.metrics.refused_connections.labels("unauthorized").inc()
            return _json_refusal(self.conn, 401, exc.code, str(exc))
        self.rights = access.rights(self.grant)
        return None

    def _refuse_malformed_upgrade(self, exc: Exception) -> None:
        """Answer 400 to an upgrade request the core could not parse.

        A head past one of the core's own limits gets 431 instead. The HTTP
        protocol refuses heads over ``--max-header-bytes`` before they come
        here and the core's limits are raised to match, so this is only a
        safeguard.
        """
        self._refused = True
        logger.debug("malformed upgrade request from %s: %s", self.peer, exc)
        if isinstance(exc.__cause__, SecurityError):
            status = b"431 Request Header Fields Too Large"
            error = {"code": "too_large", "message": "request headers too large"}
        else:
            status = b"400 Bad Request"
            error = {"code": "bad_request", "message": "malformed upgrade request"}
        body = orjson.dumps({"error": error})
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(
                b"HTTP/1.1 %b\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
                % (status, len(body), body)
            )
        transport.close()

    def _open(self) -> None:
        runtime = self.runtime
        settings = runtime.settings
        self.state = _State.OPEN
        self.id = uuid.uuid4().hex
        self.opened_at = time.monotonic()
        self._tokens_at = self.opened_at
        runtime.metrics.connections.inc()
        self._flush()
        self._write(
            control_frame(
                "welcome",
                connectionId=self.id,
                replica=settings.replica,
                pingInterval=settings.ping_interval,
                limits={
                    "maxFrameBytes": settings.max_frame_bytes,
                    "maxSubscriptions": settings.max_subscriptions,
                    "maxMessagesPerSecond": settings.max_messages_per_second,
                    "maxBufferBytes": settings.max_buffer_bytes,
                },
            )
        )
        self._ping_timer = self.loop.call_later(settings.ping_interval, self._keepalive)
        self._watch_expiry()
        user = self.grant.subject if self.grant is not None else None
        record = ConnectionRecord(
            self.id, settings.replica, "websocket", user, time.time()
        )
        # Registration runs first in the handler task, so that every operation
        # the client sends finds its connection registered.
        self._worker = self.loop.create_task(
            self._work(runtime.backend.add_connection(record))
        )
        logger.info(
            "connection %s opened from %s",
            self.id,
            self.peer,
            extra={"connection_id": self.id, "transport": "websocket"},
        )

    # Inbound frames

    def _on_frame(self, frame: Frame) -> None:
        if self._overrun:
            return
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._fragments = [frame.data]
            self._fragment_is_text = opcode is Opcode.TEXT
            self._message_size = len(frame.data)
        elif opcode is Opcode.CONT:
            # The core bounds the payload of a fragmented message, but not the
            # number of its fragments: empty ones would pile up for ever.
            self._message_size += len(frame.data) + _FRAGMENT_COST
            if self._message_size > self._max_message:
                self._fragments = []
                self._message_too_big()
                return
            self._fragments.append(frame.data)
        elif opcode is Opcode.PONG:
            self._ping_unanswered = False
            return
        elif opcode is Opcode.CLOSE:
            received = self.conn.close_rcvd
            self._note_close(
                received.code if received else CLOSE_NORMAL,
                received.reason if received else "",
            )
            self._closing()
            return
        else:
            # A ping: the core has already queued the pong.
            return
        if not frame.fin:
            return
        data = b"".join(self._fragments)
        self._fragments = []
        self._message_size = 0
        if not self._take_token():
            logger.debug("connection %s: over the message rate", self.id)
            self._client_error("rate_limited")
            # What arrived within the limit is still answered; then 1008.
            self._overrun = True
            if self._worker is None:
                self.close(CLOSE_POLICY_VIOLATION, _RATE_REASON)
            return
        if not self._fragment_is_text:
            self._client_error("binary_frame")
            self._write(
                error_frame(
                    "binary_frame", "binary messages are not accepted; send JSON text"
                )
            )
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            logger.debug("connection %s: text message is not UTF-8", self.id)
            self._client_error("invalid_utf8")
            self.close(CLOSE_INVALID_DATA, "text message is not valid UTF-8")
            return
        self._inbox.append(text)
        if len(self._inbox) >= _INBOX_HIGH and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
        if self._worker is None:
            self._worker = self.loop.create_task(self._work(None))

    def _message_too_big(self) -> None:
        """Fail the connection with 1009 for a message in too many fragments."""
        logger.debug(
            "connection %s: fragmented message over %d bytes",
            self.id,
            self._max_message,
        )
        reason = (
            f"message over {self._max_message} bytes "
            f"(each fragment counts {_FRAGMENT_COST} bytes more)"
        )
        self._note_close(CLOSE_TOO_BIG, reason)
        # Failing, as the core does for a message over its own limit, sends the
        # close frame and an end of stream, and discards what the peer still
        # sends unparsed: the rest of a flood costs nothing.
        self.conn.fail(CLOSE_TOO_BIG, reason)
        self._flush()
        self._closing()

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(
            2 * self._rate, self._tokens + (now - self._tokens_at) * self._rate
        )
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _work(self, first: Any) -> None:
        """Handle pending messages in order; end when none are left."""
        try:
            if first is not None:
                await first
            while self._inbox and self.state is _State.OPEN:
                await self._handle(self._inbox.popleft())
                if self._reading_paused and len(self._inbox) < _INBOX_HIGH // 2:
                    assert self.transport is not None
                    self.transport.resume_reading()
                    self._reading_paused = False
        except Exception:
            logger.exception("connection %s: handler failed", self.id)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._worker = None
            if self._overrun:
                self.close(CLOSE_POLICY_VIOLATION, _RATE_REASON)

    async def _handle(self, text: str) -> None:
        settings = self.runtime.settings
        try:
            operation = parse_operation(
                text,
                max_subscriptions=settings.max_subscriptions,
                max_topic_length=settings.max_topic_length,
                max_topic_depth=settings.max_topic_depth,
            )
            if isinstance(operation, Subscribe):
                await self._subscribe(operation)
            elif isinstance(operation, Unsubscribe):
                await self._unsubscribe(operation)
            elif isinstance(operation, Ping):
                self._write(control_frame("pong", ref=operation.ref))
            elif isinstance(operation, Authenticate):
                await self._authenticate(operation)
        except ClientError as exc:
            logger.debug("connection %s: %s: %s", self.id, exc.code, exc)
            self._client_error(exc.code)
            self._write(error_frame(exc.code, str(exc), request_ref(text)))

    # Operations

    async def _subscribe(self, operation: Subscribe) -> None:
        runtime = self.runtime
        rights = self.rights
        assert rights is not None
        refused = [f for f in operation.filters if not rights.allows(f)]
        if refused:
            raise Forbidden(
                f"not allowed to read {', '.join(map(repr, refused[:5]))}; "
                "nothing was subscribed"
            )
        new = [f for f in operation.filters if f not in self.filters]
        limit = runtime.settings.max_subscriptions
        if len(self.filters) + len(new) > limit:
            raise LimitExceeded(f"a connection may hold at most {limit} subscriptions")
        if operation.offsets:
            # Live events for the resumed topics wait here until their history
            # has been replayed, so that nothing arrives twice or out of order.
            hold = self._hold if self._hold is not None else {}
            for topic in operation.offsets:
                hold.setdefault(topic, [])
            self._hold = hold
        for topic_filter in new:
            self.filters.add(topic_filter)
            runtime.router.add(self, topic_filter)
        for topic_filter in new:
            await _uninterrupted(self._watch(topic_filter))
        self._write(
            control_frame(
                "subscribed", topics=list(operation.filters), ref=operation.ref
            )
        )
        await runtime.backend.add_subscriptions(self.id, new)
        for topic, after in operation.offsets.items():
            try:
                await self._replay(topic, after)
            except Unavailable as exc:
                # History cannot be read while the backend is away: say so, and
                # let the live events held for this topic go.
                self._release_hold(topic)
                self._write(
                    error_frame(
                        "unavailable",
                        f"history of {topic!r} cannot be read now ({exc}); "
                        "subscribe again with offsets to resume",
                        operation.ref,
                    )
                )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connection %s subscribed to %s", self.id, operation.filters)

    async def _replay(self, topic: str, after: int) -> None:
        """Send what ``topic`` had after ``after``, then the live events held."""
        page = self.runtime.settings.history_size
        read = await self.runtime.backend.read_history(topic, after, page)
        lost_up_to = read.first_offset - 1 if read.first_offset else read.last_offset
        if lost_up_to > after:
            self._write(
                control_frame(
                    "gap",
                    topic=topic,
                    fromOffset=after + 1,
                    toOffset=lost_up_to,
                    message="events in this range are no longer kept",
                )
            )
        if after > read.last_offset:
            # The client saw more than this topic has: its history was reset
            # (in-memory state after a restart, or Redis without persistence).
            self._write(
                error_frame(
                    "offset_ahead",
                    f"{topic!r} is at offset {read.last_offset}, before the "
                    f"{after} given; live events follow from here",
                )
            )
        # What was sent ends at the client's offset, or at the topic's last one
        # when the client is ahead: live events after a reset are new even
        # though their offsets are not above the client's.
        last = min(after, read.last_offset)
        while read.events:
            for event in read.events:
                await self._write_paced(event.frame)
                last = event.offset
            # A backend may keep more than one page (Redis trims approximately).
            if last >= read.last_offset or self.state is not _State.OPEN:
                break
            read = await self.runtime.backend.read_history(topic, last, page)
        # Live events held meanwhile go out the same way; new ones keep being
        # held until the list is empty, so the order holds.
        held = self._hold.get(topic, []) if self._hold is not None else []
        index = 0
        while index < len(held):
            event = held[index]
            index += 1
            if event.offset > last:
                await self._write_paced(event.frame)
                last = event.offset
        self._stop_holding(topic)
        if self._replayed is None:
            self._replayed = {}
        self._replayed[topic] = last

    def _stop_holding(self, topic: str) -> list[Event]:
        """Stop holding live events of ``topic``; return those held."""
        held = self._hold.pop(topic, []) if self._hold is not None else []
        if self._hold is not None and not self._hold:
            self._hold = None
        return held

    def _release_hold(self, topic: str) -> None:
        for event in self._stop_holding(topic):
            self._write(event.frame)

    async def _write_paced(self, data: bytes) -> None:
        """Write for a replay: wait for the buffer to drain instead of the cap.

        A client that resumes from far back reads a burst much larger than live
        traffic; it is not slow for that, so the replay follows its pace.
        """
        if self.state is not _State.OPEN:
            return
        assert self.transport is not None
        self.transport.write(data)
        writable = self._writable
        if writable is not None and not writable.is_set():
            await writable.wait()

    async def _authenticate(self, operation: Authenticate) -> None:
        """Take a fresh token: new rights and expiry, the same subject."""
        try:
            grant = self.runtime.access.admit(operation.token)
        except Unauthorized as exc:
            raise Unauthorized(f"token refused: {exc}") from exc
        assert grant is not None
        if self.grant is not None and grant.subject != self.grant.subject:
            raise Forbidden("a fresh token must name the same subject ('sub')")
        self.grant = grant
        self.rights = grant.rights
        # Subscriptions the new rights no longer allow end now; the answer
        # lists them, with no 'unsubscribed' for an operation never sent.
        dropped = sorted(f for f in self.filters if not grant.rights.allows(f))
        if dropped:
            await self._unsubscribe(Unsubscribe(tuple(dropped)), answer=False)
        self._watch_expiry()
        self._write(
            control_frame(
                "authenticated",
                subject=grant.subject,
                expiresAt=grant.expires_at,
                dropped=dropped,
                ref=operation.ref,
            )
        )

    def _watch_expiry(self) -> None:
        """Close the connection when its token expires."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self.grant is not None:
            delay = max(0.0, self.grant.seconds_left())
            self._expiry_timer = self.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        logger.info(
            "connection %s: token expired; closing with %d",
            self.id,
            CLOSE_TOKEN_EXPIRED,
            extra={"connection_id": self.id},
        )
        self.close(CLOSE_TOKEN_EXPIRED, "token expired")

    async def _unsubscribe(
        self, operation: Unsubscribe, *, answer: bool = True
    ) -> None:
        runtime = self.runtime
        gone = [f for f in operation.filters if f in self.filters]
        for topic_filter in gone:
            self.filters.discard(topic_filter)
            runtime.router.remove(self, topic_filter)
        if answer:
            self._write(
                control_frame(
                    "unsubscribed", topics=list(operation.filters), ref=operation.ref
                )
            )
        await runtime.backend.remove_subscriptions(self.id, gone)
        for topic_filter in gone:
            if topic_filter in self._watched:
                await _uninterrupted(self._unwatch(topic_filter))

    async def _watch(self, topic_filter: str) -> None:
        """Watch ``topic_filter`` in the backend and note that it is watched."""
        await self.runtime.backend.watch(topic_filter)
        self._watched.add(topic_filter)

    async def _unwatch(self, topic_filter: str) -> None:
        """Undo the watch of ``topic_filter`` and forget it."""
        self._watched.discard(topic_filter)
        await self.runtime.backend.unwatch(topic_filter)

    # Outbound

    def deliver(self, event: Event) -> None:
        """Send one live event (the router calls this for every match)."""
        replayed = self._replayed
        if replayed is not None and event.topic in replayed:
            # Fan-out runs behind ingest, so events a replay already sent from
            # history can still come live; only newer ones go out.
            if event.offset <= replayed[event.topic]:
                return
            del replayed[event.topic]
            if not replayed:
                self._replayed = None
        hold = self._hold
        if hold is not None:
            held = hold.get(event.topic)
            if held is not None:
                held.append(event)
                if len(held) > _HOLD_LIMIT:
                    self._too_slow()
                return
        self._write(event.frame)

    def _write(self, data: bytes) -> None:
        if self.state is not _State.OPEN:
            return
        transport = self.transport
        assert transport is not None
        if transport.get_write_buffer_size() > self._max_buffer:
            self._too_slow()
            return
        transport.write(data)

    def _too_slow(self) -> None:
        self.runtime.metrics.slow_consumer_closes.inc()
        logger.warning(
            "connection %s is reading too slowly: closing it with %d",
            self.id,
            CLOSE_TRY_AGAIN_LATER,
            extra={"connection_id": self.id},
        )
        self.close(CLOSE_TRY_AGAIN_LATER, "outbound buffer full; resume from offset")

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for chunk in self.conn.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                # The core's end of stream: half-close, so the close frame
                # already written is read before the connection ends.
                transport.write_eof()
                return

    def _client_error(self, code: str) -> None:
        self.runtime.metrics.client_errors.labels(code).inc()

    # Closing

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; abort if the peer does not finish it.

        Safe to call in any state; only the first call has an effect.
        """
        if self.state is not _State.OPEN:
            return
        self._note_close(code, reason)
        # The core may be past OPEN already (the peer ended the stream or sent
        # its close, and connection_lost has not run yet): nothing to send then.
        if self.conn.state is CoreState.OPEN:
            self.conn.send_close(code, reason)
            self._flush()
        self._closing()

    def _note_close(self, code: int, reason: str) -> None:
        self.close_code = code
        self.close_reason = reason

    def _closing(self) -> None:
        """Leave the routing table at once and give the peer a moment to reply."""
        self.state = _State.CLOSING
        self._detach()
        if self._reading_paused and self.transport is not None:
            # The peer's close reply must be read to finish the handshake.
            self.transport.resume_reading()
            self._reading_paused = False
        self._close_timer = self.loop.call_later(
            self.runtime.settings.close_timeout, self._abort
        )

    def _abort(self) -> None:
        self._close_timer = None
        self.close_reason = f"{self.close_reason} (aborted: no close reply)"
        self._hard_abort()

    def _hard_abort(self) -> None:
        """Drop the connection with a reset, discarding what the kernel still holds.

        A plain abort closes the socket gracefully underneath, and the kernel would
        go on holding (and trying to send) megabytes for a client that does not
        read; a zero linger time makes it send RST and free them at once.
        """
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    def _detach(self) -> None:
        """Remove the connection from the router now and from the backend soon."""
        if self._detached:
            return
        self._detached = True
        runtime = self.runtime
        filters = list(self.filters)
        self.filters.clear()
        runtime.router.remove_all(self, filters)
        runtime.metrics.connections.dec()
        self._hold = None
        worker = self._worker
        if worker is not None:
            worker.cancel()
        runtime.spawn(
            _unregister(runtime, self.id, self._watched, worker),
            f"unregistering connection {self.id}",
        )

    # Keepalive

    def _keepalive(self) -> None:
        self._ping_timer = None
        if self.state is not _State.OPEN:
            return
        if self._ping_unanswered:
            logger.info(
                "connection %s: no pong within %.1f s, dropping it",
                self.id,
                self.runtime.settings.ping_interval,
                extra={"connection_id": self.id},
            )
            self._note_close(CLOSE_ABNORMAL, "keepalive timeout")
            self.state = _State.CLOSING
            self._detach()
            self._hard_abort()
            return
        self._ping_unanswered = True
        self.conn.send_ping(os.urandom(4))
        self._flush()
        self._ping_timer = self.loop.call_later(
            self.runtime.settings.ping_interval, self._keepalive
        )


async def _unregister(
    runtime: Runtime,
    connection_id: str,
    watched: set[str],
    worker: asyncio.Task[None] | None,
) -> None:
    # Let a cancelled handler finish first, so that a registration it was
    # making cannot land after the removal. A watch it had started completes
    # and lands in ``watched`` (see _uninterrupted), which is read only now.
    if worker is not None:
        await asyncio.wait([worker])
    backend = runtime.backend
    await backend.remove_connection(connection_id)
    filters = list(watched)
    watched.clear()
    for topic_filter in filters:
        await backend.unwatch(topic_filter)


async def _uninterrupted(step: Coroutine[Any, Any, None]) -> None:
    """Run ``step`` to its end even if the caller is cancelled meanwhile.

    A backend watch counts itself before its first await, so one cut short
    would leave a count behind that nothing undoes; and the bookkeeping that
    follows it must not be skipped either. Cancelling the caller still works:
    it waits for the step, then raises CancelledError.

    Raises:
        Whatever ``step`` raises, when the caller was not cancelled.
    """
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Waited for without awaiting it, so a second cancel cannot reach it.
        await asyncio.wait([task])
        if not task.cancelled():
            # The connection is going away: a failure of the step is moot
            # then, and is retrieved only so that asyncio does not report it.
            task.exception()
        raise


def _allow_heads_up_to(max_header_bytes: int) -> None:
    """Let the core parse any upgrade request head the HTTP protocol let through.

    uvicorn parses the head first, bounded by ``--max-header-bytes`` in
    ``GatewayHttpProtocol``, then hands the core the head it rebuilt. The
    core's own limits (8,192 bytes a line, 128 headers) would refuse with 400
    a head the gateway allows, such as one with a 10 KB token. websockets
    reads them from module globals at each parse (set from
    ``WEBSOCKETS_MAX_LINE_LENGTH`` and ``WEBSOCKETS_MAX_NUM_HEADERS`` when it
    is imported), so they are raised there, for the whole process and never
    lowered. A line may be a little longer than in the client's head, since
    uvicorn writes ``name: value``, hence the margin.
    """
    line = max_header_bytes + 64
    if http11.MAX_LINE_LENGTH < line:
        http11.MAX_LINE_LENGTH = line
    # The shortest header line, "a:" and CRLF, takes 4 bytes.
    headers = max_header_bytes // 4 + 1
    if http11.MAX_NUM_HEADERS < headers:
        http11.MAX_NUM_HEADERS = headers


def _json_refusal(
    conn: ServerProtocol, status: int, code: str, message: str
) -> Response:
    """A refusal of the upgrade with the gateway's usual JSON error body."""
    response = conn.reject(status, "")
    body = orjson.dumps({"error": {"code": code, "message": message}})
    # websockets' headers are a multidict: setting adds, so remove first.
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(body))
    return dataclasses.replace(response, body=body)
