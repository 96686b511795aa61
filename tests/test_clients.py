"""The Python clients of ``clients.strategies`` against real gateways and brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RUN_ID
from services import MosquittoServer
from support import (
    Gateway,
    event,
    free_port,
    publish,
    running_gateway,
    start_gateway,
    timeout,
)
from test_mqtt import wait_connected

from clients.strategies import (
    STRATEGIES,
    Backoff,
    Event,
    PollingSubscriber,
    SubscribeError,
    Subscriber,
    WebSocketSubscriber,
    make_subscriber,
)

#: Fast reconnection for tests.
FAST = Backoff(initial=0.05, maximum=0.3)


@pytest.fixture
def qos1_topic(request: pytest.FixtureRequest) -> str:
    """A unique topic under ``fixtures/``, which the gateway publishes at QoS 1."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    return f"fixtures/{RUN_ID}/{name}"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A Mosquitto of the test's own, with persistent sessions."""
    broker = MosquittoServer(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def subscriber(
    via: str, gateway_port: int, broker: MosquittoServer, topics: list[str]
) -> Subscriber:
    return make_subscriber(
        via,
        topics,
        url=f"http://127.0.0.1:{gateway_port}",
        mqtt_url=broker.url(),
        poll_interval=0.1,
        backoff=Backoff(initial=0.05, maximum=0.3),
        connect_timeout=timeout(10),
    )


async def take(client: Subscriber, count: int, seconds: float = 10) -> list[Event]:
    """The next ``count`` events of ``client``, within ``seconds`` (scaled)."""
    events: list[Event] = []
    async with asyncio.timeout(timeout(seconds)):
        async for item in client:
            events.append(item)
            if len(events) == count:
                break
    return events


async def publish_numbered(
    http: httpx.AsyncClient, gateway: Gateway, topic: str, numbers: range
) -> None:
    response = await publish(http, gateway, [event(topic, n) for n in numbers])
    assert response.status_code == 200, response.text


@contextlib.asynccontextmanager
async def subscribed(*clients: Subscriber) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        yield


async def test_each_strategy_receives_the_same_events_in_order(
    tmp_path: Path, mosquitto: MosquittoServer, qos1_topic: str, http: httpx.AsyncClient
) -> None:
    """Polling, WebSocket and MQTT clients get the same events, in offset order."""
    with running_gateway(tmp_path, mqtt_url=mosquitto.url()) as gateway:
        wait_connected(gateway)
        clients = [
            subscriber(v, gateway.port, mosquitto, [qos1_topic]) for v in STRATEGIES
        ]
        async with subscribed(*clients):
            await publish_numbered(http, gateway, qos1_topic, range(20))
            received = [await take(client, 20) for client in clients]
    ids = [[e.id for e in events] for events in received]
    assert ids[0] == ids[1] == ids[2]
    for events in received:
        assert [e.offset for e in events] == list(range(1, 21))
        assert [e.details["n"] for e in events] == list(range(20))
        assert all(e.topic == qos1_topic for e in events)
        assert all(0 <= e.delay() < timeout(5) for e in events)
    assert all(client.duplicates == 0 for client in clients)


@pytest.mark.parametrize("via", STRATEGIES)
async def test_resumes_after_gateway_restart_without_loss(
    via: str,
    tmp_path: Path,
    shared_redis: str,
    mosquitto: MosquittoServer,
    qos1_topic: str,
    http: httpx.AsyncClient,
) -> None:
    """After the gateway (and, for MQTT, the broker) restarts, nothing is lost.

    The gateway keeps its history in Redis and comes back on the same port; the
    events published before the client is back reach it once, in order. For MQTT
    the broker restarts too and the persistent session holds the QoS 1 events.
    """
    port = free_port()
    settings: dict[str, Any] = {"port": port, "mqtt_url": mosquitto.url()}
    gateway = start_gateway(tmp_path, **settings)
    try:
        wait_connected(gateway)
        client = subscriber(via, port, mosquitto, [qos1_topic])
        async with client:
            await publish_numbered(http, gateway, qos1_topic, range(5))
            before = await take(client, 5)
            # In threads, so that the client runs meanwhile and sees the outage.
            await asyncio.to_thread(gateway.stop)
            if via == "mqtt":
                await asyncio.to_thread(mosquitto.stop)
                await asyncio.to_thread(mosquitto.start)
            gateway = await asyncio.to_thread(start_gateway, tmp_path, **settings)
            await asyncio.to_thread(wait_connected, gateway)
            # Published at once: the client is most likely still away.
            await publish_numbered(http, gateway, qos1_topic, range(5, 10))
            after = await take(client, 5, seconds=20)
            if via != "poll":
                # A poller waits the gateway's Retry-After (1 s) between polls
                # and may sleep through the outage: it then simply polls the
                # new gateway, which is the point.
                assert client.reconnects >= 1
    finally:
        gateway.stop()
    events = before + after
    assert [e.offset for e in events] == list(range(1, 11))
    assert [e.details["n"] for e in events] == list(range(10))
    assert client.gaps == []


async def test_websocket_client_resumes_from_given_offsets(
    gateway: Gateway, qos1_topic: str, http: httpx.AsyncClient
) -> None:
    """A new client given an offset gets what followed it, then live events."""
    await publish_numbered(http, gateway, qos1_topic, range(6))
    client = WebSocketSubscriber(
        gateway.http_url, [qos1_topic], offsets={qos1_topic: 3}, backoff=FAST
    )
    async with client:
        await publish_numbered(http, gateway, qos1_topic, range(6, 8))
        events = await take(client, 5)
    assert [e.offset for e in events] == [4, 5, 6, 7, 8]


async def test_refused_subscription_ends_the_client(
    tmp_path: Path, qos1_topic: str
) -> None:
    """A bad topic is an error the caller sees, not a reconnection loop."""
    with running_gateway(tmp_path) as gateway:
        client = WebSocketSubscriber(gateway.http_url, ["bad topic"], backoff=FAST)
        with pytest.raises(SubscribeError, match="bad_topic"):
            async with client:
                pass
    with pytest.raises(ValueError, match="cannot poll"):
        PollingSubscriber("http://127.0.0.1:1", ["stocks/#"])


def test_duplicates_are_dropped_by_topic_and_offset() -> None:
    """An event at or below the last offset yielded for its topic is dropped."""
    client = WebSocketSubscriber("http://127.0.0.1:1", ["a/#"])
    base = {
        "id": "x",
        "publishedAt": "2026-12-03T10:00:00.000000Z",
        "eventSource": "t",
        "eventType": "PRICE_CHANGED",
        "eventDetails": {},
    }
    for topic, offset in [("a/1", 1), ("a/1", 2), ("a/1", 2), ("a/2", 1), ("a/1", 1)]:
        client._deliver({**base, "topic": topic, "offset": offset}, 0.0)
    assert client.duplicates == 2
    assert client.offsets == {"a/1": 2, "a/2": 1}
    backoff = Backoff(initial=1, maximum=4)
    delays = [backoff.next_delay() for _ in range(4)]
    assert [round(d / b, 1) <= 1.2 for d, b in zip(delays, [1, 2, 4, 4], strict=True)]
    assert 0.8 * 4 <= delays[-1] <= 1.2 * 4


async def test_listen_prints_events_with_their_delay(
    tmp_path: Path, qos1_topic: str, http: httpx.AsyncClient
) -> None:
    """``gateway listen --via poll`` prints one line per event, with its delay."""
    with running_gateway(tmp_path) as gateway:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "listen",
            "--via",
            "poll",
            "--url",
            gateway.http_url,
            "--poll-interval",
            "0.1",
            "--count",
            "3",
            qos1_topic,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            async with asyncio.timeout(timeout(15)):
                line = await process.stderr.readline()
                assert b"listening to" in line, line
                await publish_numbered(http, gateway, qos1_topic, range(3))
                out, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    lines = out.decode().splitlines()
    assert process.returncode == 0
    assert len(lines) == 3
    for offset, line in enumerate(lines, 1):
        assert f"{qos1_topic}  #{offset}  PRICE_CHANGED  delay " in line
        assert line.endswith(f'{{"n":{offset - 1}}}')


async def test_bench_reports_every_strategy(tmp_path: Path) -> None:
    """A short ``gateway bench`` run delivers everything and writes its report."""
    out = tmp_path / "report"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "bench",
        "--clients",
        "5",
        "--rate",
        "10",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--poll-interval",
        "0.5",
        "--no-progress",
        "--out",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(timeout(60)):
        output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    report = json.loads((out / "report.json").read_text())
    assert set(report["strategies"]) == set(STRATEGIES)
    for name, figures in report["strategies"].items():
        assert figures["deliveries_expected"] == 5 * 20, name
        assert figures["lost"] == 0 and figures["duplicates"] == 0, name
        assert figures["bytes_per_client_per_event"]["received"] > 100, name
        assert figures["gateway_cpu_pct"] is not None, name
    poll, ws = report["strategies"]["poll"], report["strategies"]["ws"]
    # Polling waits for the next poll; push does not.
    assert poll["latency_ms"]["p50"] > ws["latency_ms"]["p50"]
    assert poll["client_messages_per_second"] == pytest.approx(10, rel=0.3)
    assert "broker_cpu_pct" in report["strategies"]["mqtt"]
    for name in report["plots"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert "| latency p50 / p90 ms |" in (out / "report.md").read_text()


async def test_unreachable_gateway_is_named_when_subscribing_times_out() -> None:
    """A subscriber that never reaches the gateway says why in its timeout."""
    from support import free_port

    url = f"http://127.0.0.1:{free_port()}"
    for subscriber in (
        WebSocketSubscriber(url, ["stocks/#"], backoff=FAST, connect_timeout=0.5),
        PollingSubscriber(url, ["stocks/AAPL"], backoff=FAST, connect_timeout=0.5),
    ):
        with pytest.raises(TimeoutError, match="not subscribed within 0.5 s: .+"):
            async with subscriber:
                pass
