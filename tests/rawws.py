"""WebSocket clients written by hand, for tests that must control every buffer.

A client library reads the socket in the background and queues what it reads, so
a test using one cannot make a client that truly stops reading. These clients
read only when the test asks: what they do not read stays in the kernel's receive
buffer, whose size the test chooses before connecting. They speak just enough of
RFC 6455 for the gateway: the opening handshake, masked frames out, unmasked
frames in, and pong answers.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import os
import socket
import struct
import termios
from dataclasses import dataclass, field
from typing import Any

import orjson

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

#: What a browser sends when it offers compression.
BROWSER_DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as the server sent it.

    Attributes:
        first_byte: FIN, the three RSV bits and the opcode, as on the wire.
        payload: the payload bytes exactly as received (servers never mask).
    """

    first_byte: int
    payload: bytes

    @property
    def opcode(self) -> int:
        return self.first_byte & 0x0F

    @property
    def fin(self) -> bool:
        return bool(self.first_byte & 0x80)

    @property
    def rsv1(self) -> bool:
        """Set on a compressed message; must be clear when nothing was negotiated."""
        return bool(self.first_byte & 0x40)

    def json(self) -> dict[str, Any]:
        """The payload of a text frame, decoded."""
        assert self.opcode == OP_TEXT, self
        message: dict[str, Any] = orjson.loads(self.payload)
        return message

    def close_code(self) -> int | None:
        """The status code of a close frame, or None when it carries none."""
        assert self.opcode == OP_CLOSE, self
        if len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code


class FrameParser:
    """Splits the bytes a server sends into frames, however they were chunked."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame they complete."""
        buffer = self._buffer
        buffer += data
        frames = []
        position = 0
        end = len(buffer)
        while end - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            # A server frame with the mask bit set breaks RFC 6455, 5.1.
            assert not second & 0x80, "the server masked a frame"
            length = second & 0x7F
            start = position + 2
            if length == 126:
                if end - start < 2:
                    break
                length = struct.unpack_from("!H", buffer, start)[0]
                start += 2
            elif length == 127:
                if end - start < 8:
                    break
                length = struct.unpack_from("!Q", buffer, start)[0]
                start += 8
            if end - start < length:
                break
            frames.append(Frame(first, bytes(buffer[start : start + length])))
            position = start + length
        del buffer[:position]
        return frames


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame from client to server, masked as RFC 6455, 5.3 requires."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    # XOR with the key repeated over the payload, done as one big integer.
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (
        int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    ).to_bytes(length, "big")
    return header + mask + masked


def text(message: Any) -> bytes:
    """A masked text frame holding ``message`` as JSON."""
    return client_frame(OP_TEXT, orjson.dumps(message))


def upgrade_request(
    host: str, port: int, path: str = "/ws", extensions: str | None = None
) -> tuple[bytes, str]:
    """An opening handshake request and the Sec-WebSocket-Accept it must get."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Origin: http://{host}:{port}",
    ]
    if extensions is not None:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    accept = base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest())
    return request, accept.decode()


@dataclass(frozen=True, slots=True)
class Response:
    """The server's answer to the opening handshake."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def parse_response(head: bytes) -> Response:
    """Decode a status line and headers (everything before the blank line)."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        # Repeated headers are joined, so that a second extensions header is seen.
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Response(int(status_line.split()[1]), headers)


def check_accept(response: Response, accept: str) -> None:
    """Fail unless the response completes the handshake for this request."""
    assert response.status == 101, response
    assert response.header("sec-websocket-accept") == accept, response


@dataclass
class Ending:
    """How a connection ended, as seen by a client reading what was left.

    Attributes:
        frames: every frame read before the end.
        how: ``"close"`` (a close frame), ``"eof"``, ``"reset"`` or ``"timeout"``.
        close_code: the code of the close frame, when there was one.
    """

    frames: list[Frame]
    how: str
    close_code: int | None = None


class RawWebSocket:
    """A client on a non-blocking socket that reads only when asked to.

    Between calls nothing reads the socket, so the server sees exactly the
    receive window the kernel advertises. Not safe for two tasks at once.
    """

    def __init__(self, sock: socket.socket, response: Response, rest: bytes) -> None:
        self.sock = sock
        self.response = response
        self._parser = FrameParser()
        self._pending: list[Frame] = self._parser.feed(rest)
        self._loop = asyncio.get_running_loop()
        #: The welcome message, once ``subscribe`` has read it.
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        host: str = "127.0.0.1",
        rcvbuf: int | None = None,
        extensions: str | None = None,
        seconds: float = 5.0,
    ) -> RawWebSocket:
        """Open a connection and finish the opening handshake.

        Args:
            port: the gateway's port.
            host: its address.
            rcvbuf: SO_RCVBUF in bytes, set before connecting so that the window
                the kernel offers stays that small (Linux doubles the value).
            extensions: a Sec-WebSocket-Extensions offer to send.
            seconds: time allowed for the connection and the handshake.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            async with asyncio.timeout(seconds):
                await loop.sock_connect(sock, (host, port))
                request, accept = upgrade_request(host, port, extensions=extensions)
                await loop.sock_sendall(sock, request)
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        raise ConnectionError(f"EOF during handshake: {received!r}")
                    received += chunk
        except BaseException:
            sock.close()
            raise
        head, _, rest = received.partition(b"\r\n\r\n")
        response = parse_response(head)
        check_accept(response, accept)
        return cls(sock, response, rest)

    @property
    def rcvbuf(self) -> int:
        """The receive buffer the kernel actually gave the socket, in bytes."""
        size: int = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return size

    def unread_bytes(self) -> int:
        """Bytes waiting in the kernel's receive buffer (FIONREAD)."""
        size = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0" * 4)
        count: int = struct.unpack("i", size)[0]
        return count

    async def send(self, message: Any) -> None:
        """Send one JSON message in a masked text frame."""
        await self._loop.sock_sendall(self.sock, text(message))

    async def recv_frame(self, seconds: float = 5.0) -> Frame:
        """The next frame; pings are answered and skipped.

        Raises:
            TimeoutError: nothing complete arrived within ``seconds``.
            ConnectionError: the server ended the TCP connection.
        """
        async with asyncio.timeout(seconds):
            while True:
                while self._pending:
                    frame = self._pending.pop(0)
                    if frame.opcode == OP_PING:
                        await self._loop.sock_sendall(
                            self.sock, client_frame(OP_PONG, frame.payload)
                        )
                        continue
                    return frame
                chunk = await self._loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise ConnectionError("EOF")
                self._pending = self._parser.feed(chunk)

    async def recv(self, seconds: float = 5.0) -> dict[str, Any]:
        """The next text message, decoded; a close frame fails the test."""
        frame = await self.recv_frame(seconds)
        assert frame.opcode == OP_TEXT, (frame, frame.payload[:200])
        return frame.json()

    async def subscribe(
        self, *topics: str, offsets: dict[str, int] | None = None
    ) -> None:
        """Subscribe and read up to the ``subscribed`` answer.

        Only control messages may come before it: a resume replays history after
        the answer, never before.
        """
        message: dict[str, Any] = {"op": "subscribe", "topics": list(topics)}
        if offsets is not None:
            message["offsets"] = offsets
        await self.send(message)
        while True:
            answer = await self.recv()
            if answer["type"] == "subscribed":
                return
            assert answer["type"] == "welcome", answer
            self.welcome = answer

    async def read_to_end(self, seconds: float) -> Ending:
        """Read everything left until the server closes, ends or resets.

        A close frame is answered, as RFC 6455, 5.5.1 asks; the TCP end that
        follows is not waited for.
        """
        frames: list[Frame] = []
        try:
            async with asyncio.timeout(seconds):
                while True:
                    try:
                        frame = await self.recv_frame(seconds)
                    except ConnectionResetError:
                        return Ending(frames, "reset")
                    except ConnectionError:
                        return Ending(frames, "eof")
                    if frame.opcode == OP_CLOSE:
                        code = frame.close_code()
                        reply = frame.payload[:2]
                        await self._loop.sock_sendall(
                            self.sock, client_frame(OP_CLOSE, reply)
                        )
                        return Ending(frames, "close", code)
                    frames.append(frame)
        except TimeoutError:
            return Ending(frames, "timeout")

    def close(self) -> None:
        """Drop the socket without a closing handshake."""
        self.sock.close()


class IdleClient(asyncio.Protocol):
    """A cheap client for tests with thousands of connections.

    It sends the upgrade request, keeps the handshake response, answers pings and
    collects frames; the test sends operations and waits on its futures.
    """

    def __init__(self, request: bytes, accept: str) -> None:
        self._request = request
        self._accept = accept
        self._head = b""
        self._parser = FrameParser()
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        loop = asyncio.get_running_loop()
        #: Done when the welcome message has arrived.
        self.welcomed: asyncio.Future[None] = loop.create_future()
        #: Done when the ``subscribed`` answer has arrived.
        self.subscribed: asyncio.Future[None] = loop.create_future()
        #: Done with the first event frame.
        self.first_event: asyncio.Future[Frame] = loop.create_future()
        #: Done when the connection is lost, with how it ended.
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.frames: list[Frame] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, _, data = self._head.partition(b"\r\n\r\n")
            self._head = b""
            self.response = parse_response(head)
            check_accept(self.response, self._accept)
        for frame in self._parser.feed(data):
            self._on_frame(frame)

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode == OP_PING:
            self.send_frame(client_frame(OP_PONG, frame.payload))
            return
        self.frames.append(frame)
        if frame.opcode != OP_TEXT:
            return
        # Told apart by their first key, which the gateway always writes first;
        # nothing is decoded, so event payloads stay the bytes as received.
        if frame.payload.startswith(b'{"type":"welcome"'):
            _settle(self.welcomed, None)
        elif frame.payload.startswith(b'{"type":"subscribed"'):
            _settle(self.subscribed, None)
        elif frame.payload.startswith(b'{"type":"event"'):
            _settle(self.first_event, frame)

    def send_frame(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        _settle(self.lost, exc)
        for future in (self.welcomed, self.subscribed, self.first_event):
            if not future.done():
                future.set_exception(ConnectionError(f"connection lost: {exc}"))
                # Retrieved here so that an unawaited one does not warn.
                future.exception()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def open_idle_client(
    port: int, *, host: str = "127.0.0.1", extensions: str | None = None
) -> IdleClient:
    """Connect one ``IdleClient`` and wait for its welcome message."""
    loop = asyncio.get_running_loop()
    request, accept = upgrade_request(host, port, extensions=extensions)
    _, client = await loop.create_connection(
        lambda: IdleClient(request, accept), host, port
    )
    await client.welcomed
    return client
