"""Helpers shared by the tests: a gateway in a subprocess, clients, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
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
#: Read rights that let a client without a token subscribe to anything ('#').
READ_ALL = "#,jobs/#"


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
    # Without a broker URL the gateway would start an embedded broker on 1883,
    # which the machine's own Mosquitto holds; tests that want one say so.
    env["GATEWAY_MQTT_BROKER"] = "none"
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


async def admin_stats(client: httpx.AsyncClient, gateway: Gateway) -> dict[str, Any]:
    """The answer of ``/admin/stats``, asked with the API key; fails unless 200."""
    response = await client.get(
        f"{gateway.http_url}/admin/stats",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200, response.text
    stats: dict[str, Any] = response.json()
    return stats


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
        self.started = time.monotonic()
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
        slow = [
            (number, round(self.sent[number] - self.started, 2), round(delay, 3))
            for number, _, delay in self.received
            if delay > timeout(max_delay)
        ]
        assert not slow, (
            f"events later than {timeout(max_delay)} s "
            f"(number, seconds into the run, delay): {slow}"
        )
