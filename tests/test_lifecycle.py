"""Health, readiness, metrics, admin stats, keepalive and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from rawws import OP_CLOSE, OP_PING, RawWebSocket, open_socket, read_to_eof
from support import (
    Gateway,
    WsClient,
    admin_stats,
    assert_no_error_logged,
    event,
    free_port,
    messages_before_pong,
    publish,
    read_metrics,
    running_gateway,
    start_gateway,
    timeout,
    wait_until,
    ws_client,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


async def test_healthz_and_readyz_answer_200_with_json(
    gateway: Gateway, http: httpx.AsyncClient, backend: str
) -> None:
    """/healthz answers ok; /readyz names a ready backend and is not draining."""
    health = await http.get(f"{gateway.http_url}/healthz")
    ready = await http.get(f"{gateway.http_url}/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["draining"] is False
    assert body["backend"] == {"name": backend, "ready": True}
    assert isinstance(body["replica"], str) and body["replica"]


async def test_metrics_follow_connections_subscriptions_and_deliveries(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Gauges rise and fall with clients; counters grow by what was delivered."""
    before = await read_metrics(http, gateway)
    async with ws_client(gateway) as first, ws_client(gateway) as second:
        await first.subscribe(topic, f"{topic}/+")
        await second.subscribe(topic)
        await publish(http, gateway, [event(topic, n) for n in range(5)])
        await first.events(5)
        await second.events(5)
        await first.connection.send("{not json")
        assert (await first.recv())["code"] == "bad_json"
        during = await read_metrics(http, gateway)

    async def all_closed() -> bool:
        return (await read_metrics(http, gateway))["gateway_connections"] == 0

    await wait_until(all_closed, 5, "gateway_connections back to 0")
    after = await read_metrics(http, gateway)

    def grew(name: str, samples: dict[str, float]) -> float:
        return samples.get(name, 0.0) - before.get(name, 0.0)

    assert before["gateway_connections"] == 0
    assert during["gateway_connections"] == 2
    assert during["gateway_subscriptions"] == 3
    assert grew("gateway_events_in_total", during) == 5
    assert grew("gateway_deliveries_total", during) == 10
    assert grew("gateway_delivery_latency_seconds_count", during) == 5
    assert grew('gateway_client_errors_total{code="bad_json"}', during) == 1
    assert after["gateway_subscriptions"] == 0
    assert grew('gateway_closes_total{code="1000"}', after) == 2
    assert grew("gateway_slow_consumer_closes_total", after) == 0


async def test_admin_stats_need_the_key_and_track_clients_and_offsets(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """/admin/stats needs the key, then counts connections, subscribers per
    filter and last offsets as clients come and go."""
    missing = await http.get(f"{gateway.http_url}/admin/stats")
    wrong = await http.get(
        f"{gateway.http_url}/admin/stats", headers={"Authorization": "Bearer nope"}
    )
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"

    def by_topic(body: dict[str, Any]) -> dict[str, tuple[int, int]]:
        return {
            item["topic"]: (item["subscribers"], item["lastOffset"])
            for item in body["topics"]
            if item["topic"].startswith(topic)
        }

    expected_open = {topic: (2, 3), f"{topic}/+": (1, 0)}
    async with ws_client(gateway) as first, ws_client(gateway) as second:
        await first.subscribe(topic, f"{topic}/+")
        await second.subscribe(topic)
        await publish(http, gateway, [event(topic, n) for n in range(3)])

        async def registered() -> bool:
            body = await admin_stats(http, gateway)
            return body["connections"] == 2 and by_topic(body) == expected_open

        await wait_until(registered, 5, "two connections in /admin/stats")

    async def unregistered() -> bool:
        body = await admin_stats(http, gateway)
        return body["connections"] == 0 and by_topic(body) == {topic: (0, 3)}

    await wait_until(unregistered, 5, "connections gone from /admin/stats")


async def test_keepalive_aborts_only_the_peer_that_never_answers_pings(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """With ping_interval P=1 s a silent peer is aborted within 2P+1 s, while a
    client that answers pings stays connected past 3 s."""
    interval = 1.0
    with running_gateway(tmp_path, ping_interval=interval) as gateway:
        async with ws_client(gateway) as live:
            await live.subscribe(topic)
            silent = await RawWebSocket.opened(gateway.port, answer_pings=False)
            opened = time.monotonic()
            try:
                frames, how = await silent.read_to_eof(2 * interval + 5)
                lasted = time.monotonic() - opened
            finally:
                silent.close()

            async def only_live_left() -> bool:
                metrics = await read_metrics(http, gateway)
                return metrics["gateway_connections"] == 1

            await wait_until(only_live_left, 2, "gateway_connections back to 1")
            # The live client answers every ping in the background meanwhile.
            await live.expect_silence(max(0.0, opened + 3.5 - time.monotonic()))
            assert await messages_before_pong(live) == []
            await publish(http, gateway, event(topic, 1))
            delivered = await live.events(1)
            metrics = await read_metrics(http, gateway)
    assert live.welcome["pingInterval"] == interval
    assert any(frame.opcode == OP_PING for frame in frames)
    assert not any(frame.opcode == OP_CLOSE for frame in frames)
    assert how in ("eof", "reset")
    assert interval <= lasted <= timeout(2 * interval + 1), lasted
    assert delivered[0]["offset"] == 1
    assert metrics["gateway_connections"] == 1
    assert metrics['gateway_closes_total{code="1006"}'] == 1


# C10, on one replica and a smaller scale: 50 clients instead of 500.

CLIENTS = 50
STUCK_UPGRADES = 3
SHUTDOWN_LIMIT = 10.0


async def _read_until_closed(
    client: WsClient, offsets: list[int], closed_at: list[float]
) -> int | None:
    # Reads events until the gateway closes; returns the close code it sent.
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = orjson.loads(await client.connection.recv())
            if message["type"] == "event":
                offsets.append(message["offset"])
    closed_at.append(time.monotonic())
    received = client.connection.protocol.close_rcvd
    return None if received is None else received.code


async def _publish_steadily(
    http: httpx.AsyncClient, gateway: Gateway, topic: str, rate: float
) -> None:
    # Publishes at a steady rate until the gateway stops answering.
    sent = 0
    start = time.monotonic()
    while True:
        await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        try:
            response = await publish(http, gateway, event(topic, sent))
        except httpx.HTTPError:
            return
        if response.status_code != 200:
            return
        sent += 1


async def _refused_at_once(gateway: Gateway) -> bool:
    # True once /readyz answers 503 or the port refuses connections.
    try:
        async with httpx.AsyncClient(timeout=1) as fresh:
            response = await fresh.get(f"{gateway.http_url}/readyz")
    except httpx.TransportError:
        return True
    return response.status_code == 503


def _redis_records_left() -> int:
    prefix = os.environ["GATEWAY_REDIS_PREFIX"]
    client = redis.Redis.from_url(os.environ["GATEWAY_REDIS_URL"])
    try:
        records = list(client.scan_iter(match=f"{prefix}conn:*"))
        return len(records) + int(client.zcard(f"{prefix}connections"))
    finally:
        client.close()


async def test_c10_sigterm_closes_everyone_then_exits_0(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """C10: on SIGTERM readiness drops at once, clients get 1001, half-done
    upgrades are closed cleanly, a slow reader is aborted and the process exits 0
    within 10 s."""
    live = f"{topic}/live"
    bulk = f"{topic}/bulk"
    # The slow reader must still be open at SIGTERM with its buffers full, so
    # the outbound cap is raised well above what the kernel can hold for it.
    gateway = start_gateway(
        tmp_path,
        max_event_bytes=2 * 1024 * 1024,
        max_body_bytes=16 * 1024 * 1024,
        max_buffer_bytes=64 * 1024 * 1024,
    )
    stack = contextlib.AsyncExitStack()
    sockets = []
    try:
        clients = [
            await stack.enter_async_context(ws_client(gateway)) for _ in range(CLIENTS)
        ]
        for client in clients:
            await client.subscribe(live)
        offsets: list[list[int]] = [[] for _ in clients]
        closed_at: list[float] = []
        readers = [
            asyncio.create_task(_read_until_closed(client, seen, closed_at))
            for client, seen in zip(clients, offsets, strict=True)
        ]
        publisher = asyncio.create_task(_publish_steadily(http, gateway, live, 50))

        # Upgrade requests cut off before the blank line that ends them.
        for _ in range(STUCK_UPGRADES):
            sock = await open_socket(gateway.port)
            sockets.append(sock)
            partial = f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
            await asyncio.get_running_loop().sock_sendall(sock, partial.encode())

        # A reader with a 4 KiB receive buffer that stops reading once subscribed,
        # then gets far more than the kernel buffers on both sides can hold.
        slow = await RawWebSocket.opened(gateway.port, rcvbuf=4096, answer_pings=False)
        sockets.append(slow.sock)
        await slow.send_json({"op": "subscribe", "topics": [bulk]})
        assert (await slow.recv_json())["type"] == "subscribed"
        blob = "x" * 1_000_000
        items = [event(bulk, n, blob=blob) for n in range(12)]
        assert (await publish(http, gateway, items)).status_code == 200

        async def everyone_receiving() -> bool:
            return all(len(seen) >= 3 for seen in offsets)

        await wait_until(everyone_receiving, 10, "every client receiving events")

        async def bulk_queued_for_the_slow_reader() -> bool:
            # Fan-out runs behind ingest (and, with Redis, behind pub/sub): the
            # bulk must be in the gateway's buffers before SIGTERM for the slow
            # reader to be stuck behind it.
            backlog = (await read_metrics(http, gateway))["gateway_fanout_backlog"]
            return slow.unread_bytes() > 0 and backlog == 0

        await wait_until(bulk_queued_for_the_slow_reader, 10, "bulk queued")
        metrics = await read_metrics(http, gateway)
        assert metrics["gateway_connections"] == CLIENTS + 1
        assert metrics["gateway_slow_consumer_closes_total"] == 0

        gateway.process.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        await wait_until(lambda: _refused_at_once(gateway), 0.5, "/readyz refusing")
        with contextlib.suppress(InvalidStatus, OSError):
            async with connect(gateway.ws_url, open_timeout=timeout(2)):
                raise AssertionError("a new connection was accepted while draining")

        codes = await asyncio.wait_for(
            asyncio.gather(*readers), timeout(SHUTDOWN_LIMIT)
        )
        last_close = max(closed_at) - sigterm
        stuck_ends = [await read_to_eof(sock, SHUTDOWN_LIMIT) for sock in sockets[:-1]]
        status = await asyncio.to_thread(gateway.process.wait, timeout(SHUTDOWN_LIMIT))
        exited = time.monotonic() - sigterm
        slow_frames, _ = await slow.read_to_eof(SHUTDOWN_LIMIT)
        await publisher
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait()
        for sock in sockets:
            sock.close()
        await stack.aclose()

    assert codes == [1001] * CLIENTS
    assert last_close <= timeout(SHUTDOWN_LIMIT)
    for seen in offsets:
        # No silent hole before the close: each client's offsets are contiguous.
        assert seen == list(range(seen[0], seen[0] + len(seen)))
    for data, how in stuck_ends:
        assert how == "eof"
        assert data == b"" or data.startswith(b"HTTP/1.1 503"), data
    assert status == 0
    assert exited <= timeout(SHUTDOWN_LIMIT)
    # Aborted at the deadline: the stream stops without the close frame, which
    # was still queued behind the events it never read.
    assert not any(frame.opcode == OP_CLOSE for frame in slow_frames)
    assert_no_error_logged(gateway)
    if backend == "redis":
        assert _redis_records_left() == 0


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--redis-url", "redis://127.0.0.1:{port}/0", "check --redis-url"),
        ("--jwt-public-keys", "{tmp}/missing.pem", "--jwt-public-keys / GATEWAY_"),
        ("--mqtt-data-dir", "{tmp}/file/sub", "--mqtt-data-dir / GATEWAY_"),
        ("--host", "999.1.1.1", "check --host or GATEWAY_HOST"),
    ],
)
def test_a_setting_that_cannot_work_stops_the_start_in_one_line(
    tmp_path: Path, flag: str, value: str, words: str
) -> None:
    """Unreachable Redis, an unreadable key file, a data folder under a file or
    a host that is no address here: the gateway stops before its banner with one
    line naming the flag."""
    (tmp_path / "file").write_text("not a folder")
    value = value.format(port=free_port(), tmp=tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0", flag, value],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GATEWAY_MQTT_BROKER": "none"},
    )
    assert result.returncode != 0
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "notification gateway" not in result.stdout, "banner before failing"
