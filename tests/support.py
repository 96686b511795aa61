"""Helpers shared by the tests: a gateway in a subprocess, clients, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
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
