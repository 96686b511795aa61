"""Helpers shared by the tests: a gateway in a subprocess, clients, timeouts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

#: Multiplies every timeout in the tests; raise it on a slow machine.
TIMEOUT_FACTOR = float(os.environ.get("GATEWAY_TEST_TIMEOUT_FACTOR", "1"))
API_KEY = "test-key"


def timeout(seconds: float) -> float:
    """A timeout scaled by ``GATEWAY_TEST_TIMEOUT_FACTOR``."""
    return seconds * TIMEOUT_FACTOR


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Gateway:
    """A gateway process started by a test."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the process has logged so far."""
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the gateway process, from /proc."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM the process and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout(timeout_s))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_gateway(tmp_path: Path, **settings: Any) -> Gateway:
    """Start ``gateway serve`` on a free port and wait until it is ready.

    Settings are passed as ``GATEWAY_`` variables, so they go through the same
    path as a user's environment.
    """
    port = settings.pop("port", None) or free_port()
    env = dict(os.environ)
    env.update({"GATEWAY_PORT": str(port), "GATEWAY_API_KEY": API_KEY})
    env.setdefault("GATEWAY_LOG_LEVEL", "info")
    for name, value in settings.items():
        env[f"GATEWAY_{name.upper()}"] = str(value)
    log_path = tmp_path / f"gateway-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    gateway = Gateway(process, port, log_path, settings)
    deadline = time.monotonic() + timeout(15)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{gateway.log()}")
        try:
            if httpx.get(f"{gateway.http_url}/readyz", timeout=1).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"gateway not ready in time:\n{gateway.log()}")


@contextlib.contextmanager
def running_gateway(tmp_path: Path, **settings: Any) -> Iterator[Gateway]:
    """A gateway for the length of a ``with`` block; stopped with SIGTERM after."""
    gateway = start_gateway(tmp_path, **settings)
    try:
        yield gateway
    finally:
        gateway.stop()


def event(topic: str, number: int = 0, **details: Any) -> dict[str, Any]:
    """One publish item."""
    return {
        "topic": topic,
        "eventSource": "tests",
        "eventType": "PRICE_CHANGED",
        "eventDetails": {"n": number, **details},
    }


async def publish(
    client: httpx.AsyncClient, gateway: Gateway, items: Any, *, key: str = API_KEY
) -> httpx.Response:
    """POST items (an object, a list, or raw bytes) to ``/events``."""
    headers = {"Authorization": f"Bearer {key}"}
    if isinstance(items, bytes):
        return await client.post(
            f"{gateway.http_url}/events", content=items, headers=headers
        )
    return await client.post(f"{gateway.http_url}/events", json=items, headers=headers)


class WsClient:
    """A WebSocket client of the gateway that decodes each message."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.welcome: dict[str, Any] = {}

    async def recv(self, seconds: float = 5.0) -> dict[str, Any]:
        """The next message, decoded; fails the test after ``seconds``."""
        raw = await asyncio.wait_for(self.connection.recv(), timeout(seconds))
        message: dict[str, Any] = orjson.loads(raw)
        return message

    async def send(self, message: Any) -> None:
        await self.connection.send(orjson.dumps(message).decode())

    async def subscribe(
        self, *topics: str, offsets: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """Subscribe and return the ``subscribed`` answer."""
        message: dict[str, Any] = {"op": "subscribe", "topics": list(topics)}
        if offsets is not None:
            message["offsets"] = offsets
        await self.send(message)
        answer = await self.recv()
        assert answer["type"] == "subscribed", answer
        return answer

    async def events(self, count: int, seconds: float = 10.0) -> list[dict[str, Any]]:
        """The next ``count`` messages, each required to be an event."""
        received = []
        for _ in range(count):
            message = await self.recv(seconds)
            assert message["type"] == "event", message
            received.append(message)
        return received

    async def expect_silence(self, seconds: float = 0.5) -> None:
        """Fail if any message arrives within ``seconds`` (not scaled)."""
        with contextlib.suppress(TimeoutError):
            raw = await asyncio.wait_for(self.connection.recv(), seconds)
            raise AssertionError(f"unexpected message: {raw!r}")


@contextlib.asynccontextmanager
async def ws_client(gateway: Gateway, **kwargs: Any) -> AsyncIterator[WsClient]:
    """A connected client that has read its welcome message."""
    async with connect(gateway.ws_url, **kwargs) as connection:
        client = WsClient(connection)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome", client.welcome
        yield client


# Waiting, metrics and logs.


async def wait_until(
    condition: Callable[[], Awaitable[bool]], seconds: float = 5.0, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``seconds`` (scaled)."""
    deadline = time.monotonic() + timeout(seconds)
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout(seconds)} s: {what}")
        await asyncio.sleep(0.02)


async def read_metrics(client: httpx.AsyncClient, gateway: Gateway) -> dict[str, float]:
    """The samples of ``/metrics``, keyed as Prometheus prints them.

    A sample with labels is keyed like ``gateway_closes_total{code="1000"}``.
    """
    response = await client.get(f"{gateway.http_url}/metrics")
    assert response.status_code == 200, response.text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            samples[key] = sample.value
    return samples


def assert_no_error_logged(gateway: Gateway) -> None:
    """Fail if the gateway logged anything at ERROR or above, or a traceback."""
    log = gateway.log()
    assert "Traceback" not in log, log
    assert not re.search(r"^\S+ \S+ (ERROR|CRITICAL)\b", log, re.MULTILINE), log


async def messages_before_pong(client: WsClient, seconds: float = 5.0) -> list[Any]:
    """Send a ``ping`` op and return every message that arrives before its pong.

    The gateway answers operations in order on the socket, so whatever it wrote
    before reading the ping has arrived once the pong does.
    """
    ref = os.urandom(6).hex()
    await client.send({"op": "ping", "ref": ref})
    before = []
    while True:
        message = await client.recv(seconds)
        if message.get("type") == "pong" and message.get("ref") == ref:
            return before
        before.append(message)


class FlowProbe:
    """A bystander subscriber fed at a steady rate, timing every event it gets.

    While a test makes another client misbehave, the probe publishes ``rate``
    events per second to its own topic and notes, per event, the time from just
    before the publish request to the frame's arrival. It measures from the
    publisher's side so that a stall of the gateway's HTTP handling counts too.
    """

    def __init__(
        self,
        gateway: Gateway,
        client: httpx.AsyncClient,
        topic: str,
        *,
        rate: float = 20.0,
        min_events: int = 10,
    ) -> None:
        self.gateway = gateway
        self.http = client
        self.topic = topic
        self.rate = rate
        self.min_events = min_events
        # Event number to the monotonic time its publish request started.
        self.sent: dict[int, float] = {}
        # Per event received: its number, offset and delay in seconds.
        self.received: list[tuple[int, int, float]] = []
        self._stop = False
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> FlowProbe:
        self.ws = await self._stack.enter_async_context(ws_client(self.gateway))
        await self.ws.subscribe(self.topic)
        self._tasks = [
            asyncio.create_task(self._publish()),
            asyncio.create_task(self._read()),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            publisher, reader = self._tasks
            if exc_info[0] is None:

                async def enough_sent() -> bool:
                    return len(self.sent) >= self.min_events or publisher.done()

                await wait_until(enough_sent, 10, "probe events sent")
            self._stop = True
            await asyncio.wait_for(publisher, timeout(5))
            if exc_info[0] is None:

                async def all_received() -> bool:
                    return len(self.received) >= len(self.sent) or reader.done()

                await wait_until(all_received, 5, "probe events received")
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._stack.aclose()

    async def _publish(self) -> None:
        start = time.monotonic()
        number = 0
        while not self._stop:
            # Pacing, not synchronisation: the probe publishes on a schedule.
            await asyncio.sleep(max(0.0, start + number / self.rate - time.monotonic()))
            self.sent[number] = time.monotonic()
            response = await publish(self.http, self.gateway, event(self.topic, number))
            assert response.status_code == 200, response.text
            number += 1

    async def _read(self) -> None:
        while True:
            message = await self.ws.recv(60)
            arrived = time.monotonic()
            number = message["eventDetails"]["n"]
            delay = arrived - self.sent[number]
            self.received.append((number, message["offset"], delay))

    @property
    def worst_delay(self) -> float:
        """The longest time one event took to arrive, in seconds."""
        return max(delay for _, _, delay in self.received)

    def assert_flowing(self, max_delay: float = 0.25) -> None:
        """Every event arrived once, in order, contiguous, none later than allowed."""
        assert len(self.sent) >= self.min_events
        numbers = [number for number, _, _ in self.received]
        assert numbers == list(range(len(self.sent))), numbers
        offsets = [offset for _, offset, _ in self.received]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets
        assert self.worst_delay <= timeout(max_delay), (
            f"an event took {self.worst_delay:.3f} s to arrive"
        )


# Raw WebSocket frames over a plain socket, for what a client library will not
# do: a text frame of invalid UTF-8, a header announcing more than is sent, a
# peer that never answers pings or never reads. Bytes are read only when a
# test asks, so what is not read stays in the kernel's receive buffer.

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def masked(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455, 5.3)."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(size, "big")


def client_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, length: int | None = None
) -> bytes:
    """One masked client frame.

    ``length`` puts another payload length in the header than ``len(payload)``,
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
    return header + mask + masked(payload, mask)


@dataclass(frozen=True)
class RawFrame:
    """One frame as the server sent it."""

    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """The code of a close frame, None for other frames or an empty close."""
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code

    def json(self) -> Any:
        return orjson.loads(self.payload)


def first_frame(data: bytes | memoryview) -> tuple[RawFrame, int] | None:
    """The first complete frame in ``data`` and its size, or None if incomplete."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    length = second & 0x7F
    start = 2
    if length >= 126:
        start = 4 if length == 126 else 10
        if len(data) < start:
            return None
        length = int.from_bytes(data[2:start], "big")
    mask = b""
    if second & 0x80:
        mask = bytes(data[start : start + 4])
        start += 4
    end = start + length
    if len(data) < end:
        return None
    payload = bytes(data[start:end])
    if mask:
        payload = masked(payload, mask)
    return RawFrame(bool(first & 0x80), first & 0x0F, payload), end


def split_frames(data: bytes) -> tuple[list[RawFrame], bytes]:
    """Parse the complete frames at the front of ``data``; return them and the rest."""
    frames = []
    view = memoryview(data)
    while (found := first_frame(view)) is not None:
        frame, size = found
        frames.append(frame)
        view = view[size:]
    return frames, bytes(view)


async def open_socket(gateway: Gateway, *, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to the gateway.

    ``rcvbuf`` sets the receive buffer before connecting, which also caps the
    window the peer may fill.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_end(sock: socket.socket, seconds: float = 10.0) -> tuple[bytes, str]:
    """Read until the peer ends the connection.

    Returns:
        Everything read, and ``"eof"`` for a clean end or ``"reset"``.
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


def upgrade_request(gateway: Gateway, path: str, key: str) -> bytes:
    """The opening handshake of a WebSocket client."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gateway.port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()


class RawWebSocket:
    """A WebSocket client driven frame by frame over a plain socket.

    It never answers pings on its own and reads only inside its ``recv``
    methods.
    """

    def __init__(self, sock: socket.socket, head: bytes, buffered: bytes) -> None:
        self.sock = sock
        # The server's handshake response, status line and headers.
        self.head = head
        # Bytes read from the socket but not yet parsed into frames.
        self._buffer = buffered

    @property
    def status(self) -> int:
        """The status code of the handshake response."""
        return int(self.head.split(b" ", 2)[1])

    @classmethod
    async def connect(
        cls, gateway: Gateway, *, path: str = "/ws", rcvbuf: int | None = None
    ) -> RawWebSocket:
        """Open a socket and complete the opening handshake (any status)."""
        sock = await open_socket(gateway, rcvbuf=rcvbuf)
        loop = asyncio.get_running_loop()
        key = base64.b64encode(os.urandom(16)).decode()
        try:
            await loop.sock_sendall(sock, upgrade_request(gateway, path, key))
            received = b""
            async with asyncio.timeout(timeout(5)):
                while b"\r\n\r\n" not in received:
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        break
                    received += chunk
        except BaseException:
            sock.close()
            raise
        head, _, rest = received.partition(b"\r\n\r\n")
        client = cls(sock, head, rest)
        if client.status == 101:
            digest = hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()
            accept = b"\r\nsec-websocket-accept: " + base64.b64encode(digest)
            assert accept.lower() in head.lower(), head
        return client

    @classmethod
    async def opened(cls, gateway: Gateway, *, rcvbuf: int | None = None) -> Any:
        """Connect to ``/ws`` and read the welcome message; return the client."""
        client = await cls.connect(gateway, rcvbuf=rcvbuf)
        assert client.status == 101, client.head
        welcome = await client.recv_json()
        assert welcome["type"] == "welcome", welcome
        return client

    async def send(self, data: bytes) -> None:
        """Write bytes as they are."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def send_frame(
        self, opcode: int, payload: bytes = b"", *, fin: bool = True
    ) -> None:
        await self.send(client_frame(opcode, payload, fin=fin))

    async def send_json(self, message: Any) -> None:
        await self.send_frame(OP_TEXT, orjson.dumps(message))

    async def recv_frame(self, seconds: float = 5.0) -> RawFrame:
        """The next frame; fails the test after ``seconds`` or at the end."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout(seconds)):
            while True:
                found = first_frame(self._buffer)
                if found is not None:
                    frame, size = found
                    self._buffer = self._buffer[size:]
                    return frame
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise AssertionError("connection ended before a whole frame")
                self._buffer += chunk

    async def recv_json(self, seconds: float = 5.0) -> Any:
        """The next text message, decoded; pings are skipped and not answered."""
        while True:
            frame = await self.recv_frame(seconds)
            if frame.opcode == OP_TEXT:
                return frame.json()
            assert frame.opcode in (OP_PING, OP_PONG), frame

    async def recv_close(self, seconds: float = 5.0) -> RawFrame:
        """Skip messages until the close frame and return it."""
        while True:
            frame = await self.recv_frame(seconds)
            if frame.opcode == OP_CLOSE:
                return frame

    async def read_to_end(self, seconds: float = 10.0) -> tuple[list[RawFrame], str]:
        """Read until the connection ends; return the frames and how it ended.

        A frame cut short by the end is left out.
        """
        data, how = await read_to_end(self.sock, seconds)
        frames, _ = split_frames(self._buffer + data)
        self._buffer = b""
        return frames, how

    def close(self) -> None:
        self.sock.close()
