"""WebSocket clients written by hand, for tests that must control every byte.

A client library reads the socket in the background and queues what it reads, so
a test using one cannot make a client that truly stops reading, nor send what
RFC 6455 forbids. These clients read only when the test asks: what they do not
read stays in the kernel's receive buffer, whose size the test chooses before
connecting. They speak just enough of the protocol for the gateway (the opening
handshake, masked frames out, unmasked frames in, pong answers) and break it on
request: a text frame of invalid UTF-8, a header announcing more than follows, a
peer that never answers pings. Every wait is in seconds, scaled by
``support.timeout``.
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
from support import timeout

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

    @property
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


def client_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, length: int | None = None
) -> bytes:
    """One frame from client to server, masked as RFC 6455, 5.3 requires.

    Args:
        opcode: the frame's opcode, one of the ``OP_`` constants.
        payload: the payload before masking.
        fin: clear it on every fragment of a message but the last.
        length: a payload length for the header other than ``len(payload)``,
            to send a header that announces more than follows it.
    """
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if declared < 126:
        header = struct.pack("!BB", first, 0x80 | declared)
    elif declared < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, declared)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, declared)
    mask = os.urandom(4)
    return header + mask + _masked(payload, mask)


def _masked(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated over it."""
    size = len(payload)
    repeated = (mask * (size // 4 + 1))[:size]
    # One XOR of two big integers, far faster than a loop over the bytes.
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(size, "big")


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


async def open_socket(
    port: int, *, host: str = "127.0.0.1", rcvbuf: int | None = None
) -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port``.

    Args:
        port: the gateway's port.
        host: its address.
        rcvbuf: SO_RCVBUF in bytes, set before connecting so that the window
            the kernel offers stays that small (Linux doubles the value).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_eof(sock: socket.socket, seconds: float = 10.0) -> tuple[bytes, str]:
    """Read a socket until the peer ends the connection.

    Returns:
        Everything read, and ``"eof"`` for a clean end or ``"reset"``.

    Raises:
        TimeoutError: the peer had not ended the connection within ``seconds``.
    """
    loop = asyncio.get_running_loop()
    chunks = []
    try:
        async with asyncio.timeout(timeout(seconds)):
            while chunk := await loop.sock_recv(sock, 65536):
                chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


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
    receive window the kernel advertises. With ``answer_pings`` it is a correct
    client that is merely slow: a ping met while reading is answered and
    skipped. Without it, it is a peer that never answers: ``recv_frame``
    returns pings like any other frame. Not safe for two tasks at once, except
    one task in ``send`` while another is in ``read_to_eof``, which writes
    nothing.
    """

    def __init__(
        self,
        sock: socket.socket,
        response: Response,
        rest: bytes,
        *,
        answer_pings: bool = True,
    ) -> None:
        # Read only inside the recv and read methods, never in the background.
        self.sock = sock
        # The server's answer to the opening handshake.
        self.response = response
        # Whether a ping met while reading gets its pong before being skipped.
        self.answer_pings = answer_pings
        # Holds the bytes of a frame not yet complete.
        self._parser = FrameParser()
        # Complete frames read from the socket but not yet returned.
        self._pending: list[Frame] = self._parser.feed(rest)
        self._loop = asyncio.get_running_loop()
        #: The welcome message, once ``opened`` or ``subscribe`` has read it.
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        host: str = "127.0.0.1",
        rcvbuf: int | None = None,
        extensions: str | None = None,
        answer_pings: bool = True,
        seconds: float = 5.0,
    ) -> RawWebSocket:
        """Open a connection and finish the opening handshake with status 101.

        Args:
            port: the gateway's port.
            host: its address.
            rcvbuf: SO_RCVBUF in bytes, as for ``open_socket``.
            extensions: a Sec-WebSocket-Extensions offer to send.
            answer_pings: whether the client answers the pings it reads.
            seconds: time allowed for the connection and the handshake.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout(seconds)):
            sock = await open_socket(port, host=host, rcvbuf=rcvbuf)
            try:
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
        try:
            check_accept(response, accept)
        except BaseException:
            sock.close()
            raise
        return cls(sock, response, rest, answer_pings=answer_pings)

    @classmethod
    async def opened(
        cls, port: int, *, rcvbuf: int | None = None, answer_pings: bool = True
    ) -> RawWebSocket:
        """Connect to ``/ws`` and read the welcome message; return the client."""
        client = await cls.connect(port, rcvbuf=rcvbuf, answer_pings=answer_pings)
        try:
            client.welcome = await client.recv_json()
            assert client.welcome["type"] == "welcome", client.welcome
        except BaseException:
            client.close()
            raise
        return client

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

    async def send(self, data: bytes) -> None:
        """Write bytes as they are: frames, part of one, or several at once."""
        await self._loop.sock_sendall(self.sock, data)

    async def send_frame(
        self, opcode: int, payload: bytes = b"", *, fin: bool = True
    ) -> None:
        """Send one masked frame; clear ``fin`` for all fragments but the last."""
        await self.send(client_frame(opcode, payload, fin=fin))

    async def send_json(self, message: Any) -> None:
        """Send one JSON message in a masked text frame."""
        await self.send(text(message))

    async def recv_frame(self, seconds: float = 5.0) -> Frame:
        """The next frame; with ``answer_pings``, pings are answered and skipped.

        Raises:
            TimeoutError: nothing complete arrived within ``seconds``.
            ConnectionError: the server ended the TCP connection
                (ConnectionResetError when it reset it).
        """
        async with asyncio.timeout(timeout(seconds)):
            while True:
                while self._pending:
                    frame = self._pending.pop(0)
                    if frame.opcode == OP_PING and self.answer_pings:
                        await self.send_frame(OP_PONG, frame.payload)
                        continue
                    return frame
                chunk = await self._loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise ConnectionError("EOF")
                self._pending = self._parser.feed(chunk)

    async def recv_json(self, seconds: float = 5.0) -> dict[str, Any]:
        """The next text message, decoded.

        Pings and pongs before it are skipped (pings answered only with
        ``answer_pings``); any other frame, a close included, fails the test.
        """
        while True:
            frame = await self.recv_frame(seconds)
            if frame.opcode == OP_TEXT:
                return frame.json()
            assert frame.opcode in (OP_PING, OP_PONG), (frame, frame.payload[:200])

    async def recv_close(self, seconds: float = 5.0) -> Frame:
        """Skip messages until the close frame and return it."""
        while True:
            frame = await self.recv_frame(seconds)
            if frame.opcode == OP_CLOSE:
                return frame

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
        await self.send_json(message)
        while True:
            answer = await self.recv_json()
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
            async with asyncio.timeout(timeout(seconds)):
                while True:
                    try:
                        frame = await self.recv_frame(seconds)
                    except ConnectionResetError:
                        return Ending(frames, "reset")
                    except ConnectionError:
                        return Ending(frames, "eof")
                    if frame.opcode == OP_CLOSE:
                        await self.send_frame(OP_CLOSE, frame.payload[:2])
                        return Ending(frames, "close", frame.close_code)
                    frames.append(frame)
        except TimeoutError:
            return Ending(frames, "timeout")

    async def read_to_eof(self, seconds: float = 10.0) -> tuple[list[Frame], str]:
        """Read until the TCP stream ends, answering nothing, not even a close.

        Returns:
            Every frame read, control frames included, and ``"eof"`` or
            ``"reset"``. A frame cut short by the end is left out.

        Raises:
            TimeoutError: the stream had not ended within ``seconds``.
        """
        data, how = await read_to_eof(self.sock, seconds)
        frames = self._pending + self._parser.feed(data)
        self._pending = []
        return frames, how

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
