"""Several replicas on one Redis: fan-out across them, resume anywhere, outages."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from services import RedisServer, SilentProxy
from support import (
    API_KEY,
    READ_ALL,
    Gateway,
    WsClient,
    admin_stats,
    assert_no_error_logged,
    event,
    publish,
    read_metrics,
    start_gateway,
    timeout,
    wait_until,
    ws_client,
)
from websockets.asyncio.client import connect


@pytest.fixture
def pair(tmp_path: Path, shared_redis: str) -> Iterator[tuple[Gateway, Gateway]]:
    """Two replicas, G1 and G2, sharing the machine's Redis."""
    # Clients without a token may read everything, '#' included (C07).
    first = start_gateway(tmp_path, replica="g1", anonymous_read=READ_ALL)
    try:
        second = start_gateway(tmp_path, replica="g2", anonymous_read=READ_ALL)
    except Exception:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


async def test_event_published_to_either_replica_reaches_clients_of_both(
    pair: tuple[Gateway, Gateway], http: httpx.AsyncClient, topic: str
) -> None:
    """Clients on G1 and G2 each get every event once, in order, wherever it came in."""
    first, second = pair
    async with ws_client(first) as on_first, ws_client(second) as on_second:
        await on_first.subscribe(topic)
        await on_second.subscribe(topic)
        for number in range(10):
            via = first if number % 2 else second
            response = await publish(http, via, event(topic, number))
            assert response.status_code == 200, response.text
        for client in (on_first, on_second):
            received = await client.events(10)
            assert [e["offset"] for e in received] == list(range(1, 11))
            assert [e["eventDetails"]["n"] for e in received] == list(range(10))
            await client.expect_silence(0.3)


async def test_client_resumes_on_the_other_replica(
    pair: tuple[Gateway, Gateway], http: httpx.AsyncClient, topic: str
) -> None:
    """A client that reconnects to G2 with its last offset gets what it missed."""
    first, second = pair
    async with ws_client(first) as client:
        await client.subscribe(topic)
        await publish(http, first, [event(topic, n) for n in range(3)])
        seen = await client.events(3)
    await publish(http, first, [event(topic, n) for n in range(3, 8)])
    async with ws_client(second) as client:
        await client.subscribe(topic, offsets={topic: seen[-1]["offset"]})
        missed = await client.events(5)
        assert [e["offset"] for e in missed] == [4, 5, 6, 7, 8]
        await publish(http, first, event(topic, 8))
        (live,) = await client.events(1)
        assert live["offset"] == 9
        await client.expect_silence(0.3)


async def test_c07_overlapping_filters_across_replicas(
    pair: tuple[Gateway, Gateway], http: httpx.AsyncClient
) -> None:
    """C07: on G1, published through G2: one frame per event however many match."""
    first, second = pair
    async with ws_client(first) as client:
        await client.subscribe("stocks/+", "stocks/AAPL", "#")
        await publish(http, second, [event("stocks/AAPL", n) for n in range(100)])
        await publish(http, second, [event("teams/ARG", n) for n in range(10)])
        received = await client.events(110)
        assert len({e["id"] for e in received}) == 110
        await client.expect_silence(0.5)

        await client.send({"op": "unsubscribe", "topics": ["stocks/AAPL"]})
        assert (await client.recv())["type"] == "unsubscribed"
        await publish(http, second, [event("stocks/AAPL", n) for n in range(20)])
        received = await client.events(20)
        assert len({e["id"] for e in received}) == 20
        await client.expect_silence(0.5)

        await client.send({"op": "unsubscribe", "topics": ["stocks/+", "#"]})
        assert (await client.recv())["type"] == "unsubscribed"
        await publish(http, second, [event("stocks/AAPL", n) for n in range(5)])
        await client.expect_silence(0.5)


async def test_killed_replica_leaves_no_connection_records(
    tmp_path: Path, shared_redis: str, http: httpx.AsyncClient, topic: str
) -> None:
    """A replica killed with SIGKILL leaves no records once their expiry passes."""
    ttl = 2.0
    doomed = start_gateway(tmp_path, replica="doomed", record_ttl=ttl)
    survivor = start_gateway(tmp_path, replica="survivor", record_ttl=ttl)
    try:
        clients = [await connect(doomed.ws_url) for _ in range(5)]
        for connection in clients:
            await connection.recv()
            await connection.send(f'{{"op":"subscribe","topics":["{topic}"]}}')
            await connection.recv()

        async def five_registered() -> bool:
            return bool((await admin_stats(http, survivor))["connections"] == 5)

        await wait_until(five_registered, 5, "five connections registered")
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        killed_at = time.monotonic()

        async def none_left() -> bool:
            stats = await admin_stats(http, survivor)
            subscribers = {t["topic"]: t["subscribers"] for t in stats["topics"]}
            return bool(stats["connections"] == 0 and subscribers.get(topic, 0) == 0)

        await wait_until(none_left, ttl + 3, "records expired")
        assert time.monotonic() - killed_at <= timeout(ttl + 3)
        for connection in clients:
            connection.transport.abort()
    finally:
        survivor.stop()
        if doomed.process.poll() is None:
            doomed.stop()


@pytest.mark.timeout(120)
async def test_c08_redis_restarts_lose_no_event_and_duplicate_none(
    tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C08: three Redis restarts; every event arrives once, in order, within 5 s."""
    server = RedisServer(tmp_path)
    server.start()
    monkeypatch.setenv("GATEWAY_REDIS_URL", server.url)
    ttl = 3.0
    first = start_gateway(tmp_path, replica="g1", record_ttl=ttl)
    second = start_gateway(tmp_path, replica="g2", record_ttl=ttl)
    try:
        async with ws_client(first) as client:
            await client.subscribe("stocks/AAPL")
            for number in range(100):
                response = await publish(http, second, event("stocks/AAPL", number))
                assert response.status_code == 200
            received = await client.events(100)
            offsets = [e["offset"] for e in received]
            connection_id = client.welcome["connectionId"]

            for _ in range(3):
                server.stop()
                await _expect_503(http, second)
                server.start()
                back_at = time.monotonic()
                await _publish_each_once(http, second, 100)
                batch = await client.events(100, seconds=5)
                assert time.monotonic() - back_at <= timeout(5 + 5)
                offsets += [e["offset"] for e in batch]
                numbers = [e["eventDetails"]["n"] for e in batch]
                assert numbers == list(range(100))
                await client.expect_silence(0.3)
                await _expect_record(server, connection_id, ttl / 3 + 1)
        assert offsets == sorted(set(offsets)), "an offset repeated or went back"
        assert len(offsets) == 400
    finally:
        first.stop()
        second.stop()
        server.stop()


async def _expect_503(http: httpx.AsyncClient, gateway: Gateway) -> None:
    async def refused() -> bool:
        response = await publish(http, gateway, event("stocks/AAPL", -1))
        assert response.status_code in (200, 503), response.text
        return response.status_code == 503

    await wait_until(refused, 5, "publish refused with 503 while redis is down")


async def _publish_each_once(
    http: httpx.AsyncClient, gateway: Gateway, count: int
) -> None:
    """Publish ``count`` events one by one; a 503 means not accepted, so retry."""
    for number in range(count):
        deadline = time.monotonic() + timeout(5)
        while True:
            response = await publish(http, gateway, event("stocks/AAPL", number))
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert time.monotonic() < deadline, "redis did not come back in time"
            await asyncio.sleep(0.05)


async def _expect_record(
    server: RedisServer, connection_id: str, seconds: float
) -> None:
    client = server.client()

    async def written_back() -> bool:
        return bool(client.exists(f"gateway:conn:{connection_id}"))

    try:
        await wait_until(written_back, seconds, "connection record written back")
    finally:
        client.close()


@contextlib.asynccontextmanager
async def _silent_clients(gateway: Gateway, topic: str, count: int):  # type: ignore[no-untyped-def]
    proxy = SilentProxy(gateway.port)
    await proxy.start()
    connections = []
    try:
        for _ in range(count):
            connection = await connect(
                f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None
            )
            client = WsClient(connection)
            client.welcome = await client.recv()
            await client.subscribe(topic)
            connections.append(client)
        yield proxy, connections
    finally:
        for client in connections:
            client.connection.transport.abort()
        await proxy.close()


@pytest.mark.parametrize("count", [1, 1000])
@pytest.mark.timeout(120)
async def test_c03_silent_peers_are_aborted_within_two_ping_intervals(
    tmp_path: Path,
    backend: str,
    http: httpx.AsyncClient,
    topic: str,
    count: int,
) -> None:
    """C03: peers behind a proxy that drops everything are gone within 2·P + 1 s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    interval = 1.0
    gateway = start_gateway(tmp_path, ping_interval=interval)
    try:
        baseline = gateway.rss_bytes()
        async with _silent_clients(gateway, topic, count) as (proxy, _):
            stop = asyncio.Event()
            publisher = asyncio.create_task(
                _publish_steadily(http, gateway, topic, stop)
            )
            metrics = await read_metrics(http, gateway)
            assert metrics["gateway_connections"] == count
            proxy.go_silent()
            silent_at = time.monotonic()

            async def all_dropped() -> bool:
                metrics = await read_metrics(http, gateway)
                return metrics["gateway_connections"] == 0

            await wait_until(all_dropped, 2 * interval + 5, "silent peers dropped")
            elapsed = time.monotonic() - silent_at
            stop.set()
            await publisher
        # The gauge is polled; the abort itself happened up to one poll earlier.
        assert elapsed <= timeout(2 * interval + 1) + 0.5, elapsed

        async def records_gone() -> bool:
            stats = await admin_stats(http, gateway)
            topics: list[dict[str, int]] = stats["topics"]
            return stats["connections"] == 0 and all(
                t["subscribers"] == 0 for t in topics
            )

        await wait_until(records_gone, 3, "records and subscriptions removed")
        if count > 1:
            grown = gateway.rss_bytes() - baseline
            assert grown < 15 * 1024 * 1024, f"RSS still {grown / 2**20:.1f} MiB above"
    finally:
        gateway.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _publish_steadily(
    http: httpx.AsyncClient, gateway: Gateway, topic: str, stop: asyncio.Event
) -> None:
    """Ten events per second until ``stop`` is set."""
    number = 0
    while not stop.is_set():
        response = await publish(http, gateway, event(topic, number))
        assert response.status_code == 200, response.text
        number += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


@pytest.mark.timeout(90)
async def test_subscriptions_made_while_redis_is_down_work_once_it_returns(
    tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subscribing during an outage is answered at once (history: an error frame),
    admin reads get 503, and both exact and wildcard filters deliver afterwards."""
    server = RedisServer(tmp_path)
    server.start()
    monkeypatch.setenv("GATEWAY_REDIS_URL", server.url)
    gateway = start_gateway(tmp_path)
    try:
        server.stop()
        await _expect_503(http, gateway)
        async with ws_client(gateway) as client:
            started = time.monotonic()
            await client.send(
                {
                    "op": "subscribe",
                    "topics": ["m/x", "m2/#"],
                    "offsets": {"m/x": 3},
                }
            )
            answers = [await client.recv(5), await client.recv(5)]
            assert time.monotonic() - started < timeout(2)
            assert answers[0]["type"] == "subscribed"
            assert (answers[1]["type"], answers[1]["code"]) == ("error", "unavailable")
            stats = await http.get(
                f"{gateway.http_url}/admin/stats",
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert stats.status_code == 503
            assert stats.json()["error"]["code"] == "unavailable"

            server.start()

            async def ready() -> bool:
                response = await http.get(f"{gateway.http_url}/readyz")
                return response.status_code == 200

            # Subscriptions are made again once Redis answers; /readyz says when.
            await wait_until(ready, 5, "the gateway ready again")
            for topic in ("m/x", "m2/y"):
                deadline = time.monotonic() + timeout(5)
                while (await publish(http, gateway, event(topic))).status_code != 200:
                    assert time.monotonic() < deadline, "redis did not come back"
                    await asyncio.sleep(0.05)
            received = await client.events(2, seconds=5)
            assert sorted(e["topic"] for e in received) == ["m/x", "m2/y"]
        assert_no_error_logged(gateway)
    finally:
        gateway.stop()
        server.stop()
