"""C10 at full scale: a replica with 500 clients stops, they resume on the other.

``tests/test_lifecycle.py`` covers the shutdown of one replica with 50 clients; this
file runs the case as written: two replicas on one Redis, 500 clients on the first,
five upgrades stuck halfway and one slow reader, then SIGTERM to the first replica
while 50 events per second keep coming in, and every client resuming on the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from followers import Follower, follow, follow_many
from rawws import OP_CLOSE, RawWebSocket, open_socket, read_to_eof, upgrade_request
from support import (
    Gateway,
    assert_no_error_logged,
    event,
    publish,
    read_metrics,
    start_gateway,
    timeout,
    wait_until,
)

CLIENTS = 500
STUCK_UPGRADES = 5
RATE = 50.0
SHUTDOWN_LIMIT = 10.0
CLOSE_TIMEOUT = 2.0


async def _publish_paced(
    http: httpx.AsyncClient,
    gateway: Gateway,
    topic: str,
    published: list[int],
    stop: asyncio.Event,
) -> None:
    """Publish ``RATE`` events per second until ``stop``; note each offset."""
    start = time.monotonic()
    while not stop.is_set():
        number = len(published)
        await asyncio.sleep(max(0.0, start + number / RATE - time.monotonic()))
        response = await publish(http, gateway, event(topic, number))
        assert response.status_code == 200, response.text
        published.append(response.json()["events"][0]["offset"])


async def _readyz(gateway: Gateway) -> int | None:
    """The status /readyz answers on a fresh connection; None when refused."""
    try:
        async with httpx.AsyncClient(timeout=1) as fresh:
            return (await fresh.get(f"{gateway.http_url}/readyz")).status_code
    except httpx.TransportError:
        return None


async def _upgrade_status(gateway: Gateway) -> str:
    """What a new WebSocket handshake gets: ``"refused"`` or the HTTP status."""
    try:
        sock = await open_socket(gateway.port)
    except OSError:
        return "refused"
    try:
        request, _ = upgrade_request("127.0.0.1", gateway.port)
        await asyncio.get_running_loop().sock_sendall(sock, request)
        data, _ = await read_to_eof(sock, 5)
    except OSError:
        return "refused"
    finally:
        sock.close()
    return data.split(b"\r\n", 1)[0].decode() if data else "eof"


def _records_of(prefix: str, ids: list[str], topics: list[str]) -> list[str]:
    """Every Redis record still naming one of the connection ``ids``."""
    client = redis.Redis.from_url(os.environ["GATEWAY_REDIS_URL"])
    try:
        left = []
        for connection_id in ids:
            for key in (f"conn:{connection_id}", f"conn:{connection_id}:filters"):
                if client.exists(f"{prefix}{key}"):
                    left.append(key)
            for key in ["connections", *(f"subs:{t}" for t in topics)]:
                if client.zscore(f"{prefix}{key}", connection_id) is not None:
                    left.append(f"{key} {connection_id}")
        return left
    finally:
        client.close()


@pytest.fixture
def pair(tmp_path: Path, shared_redis: str) -> Iterator[tuple[Gateway, Gateway]]:
    """G1 and G2 on the machine's Redis; big events allowed for the slow reader."""
    settings = {
        "max_event_bytes": 2 * 1024 * 1024,
        "max_body_bytes": 16 * 1024 * 1024,
        # The slow reader must still be open at SIGTERM with its buffers full.
        "max_buffer_bytes": 64 * 1024 * 1024,
        "close_timeout": CLOSE_TIMEOUT,
    }
    first = start_gateway(tmp_path, replica="g1", **settings)
    try:
        second = start_gateway(tmp_path, replica="g2", **settings)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        for gateway in (first, second):
            if gateway.process.poll() is None:
                gateway.stop()


@pytest.mark.timeout(120)
async def test_c10_sigterm_with_500_clients_and_resume_on_the_other_replica(
    pair: tuple[Gateway, Gateway],
    shared_redis: str,
    http: httpx.AsyncClient,
    topic: str,
) -> None:
    """C10: SIGTERM to G1 under 50 events/s: /readyz 503 first, new handshakes
    refused, 500 clients closed with 1001 and 5 half-done upgrades refused cleanly,
    the slow reader aborted at the close deadline, exit 0 within 10 s with no
    record left in Redis; every client resumes on G2 with each offset once."""
    first, second = pair
    live, bulk = f"{topic}/live", f"{topic}/bulk"
    loop = asyncio.get_running_loop()
    clients: list[Follower] = []
    resumed: list[Follower] = []
    sockets = []
    stop = asyncio.Event()
    published: list[int] = []
    publisher: asyncio.Task[None] | None = None
    try:
        clients = await follow_many(first.port, live, CLIENTS)
        ids = [str(client.welcome.result()["connectionId"]) for client in clients]

        # Upgrade requests cut off before the blank line that ends them.
        for _ in range(STUCK_UPGRADES):
            sock = await open_socket(first.port)
            sockets.append(sock)
            partial = f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{first.port}\r\n"
            await loop.sock_sendall(sock, partial.encode())

        # A reader with a 4 KiB receive buffer that stops reading once subscribed,
        # then gets far more than the kernel buffers on both sides can hold.
        slow = await RawWebSocket.opened(first.port, rcvbuf=4096, answer_pings=False)
        sockets.append(slow.sock)
        await slow.send_json({"op": "subscribe", "topics": [bulk]})
        assert (await slow.recv_json())["type"] == "subscribed"
        blob = "x" * 1_000_000
        items = [event(bulk, n, blob=blob) for n in range(12)]
        assert (await publish(http, second, items)).status_code == 200

        async def bulk_queued_for_the_slow_reader() -> bool:
            backlog = (await read_metrics(http, first))["gateway_fanout_backlog"]
            return slow.unread_bytes() > 0 and backlog == 0

        await wait_until(bulk_queued_for_the_slow_reader, 10, "bulk queued")

        # Events come in through G2 and reach G1's clients through Redis, so the
        # flow goes on while G1 stops.
        publisher = asyncio.create_task(
            _publish_paced(http, second, live, published, stop)
        )

        # A second of the flow reaches every client before the signal.
        async def everyone_receiving() -> bool:
            return all(len(client.offsets) >= RATE for client in clients)

        await wait_until(everyone_receiving, 15, "every client receiving events")
        metrics = await read_metrics(http, first)
        assert metrics["gateway_connections"] == CLIENTS + 1
        assert metrics["gateway_slow_consumer_closes_total"] == 0

        # Each client resumes on G2 as soon as G1 has closed it.
        async def resume(client: Follower) -> Follower:
            await asyncio.wait_for(asyncio.shield(client.closed), timeout(20))
            return await follow(second.port, live, client.offsets[-1])

        resumers = [asyncio.create_task(resume(client)) for client in clients]

        first.process.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        readiness: list[int | None] = []
        while (status := await _readyz(first)) == 200:
            readiness.append(status)
            assert time.monotonic() - sigterm < timeout(0.5), "/readyz still 200"
        readiness.append(status)
        new_upgrade = await _upgrade_status(first)

        # The half-done upgrades are finished now, while G1 drains.
        for sock in sockets[:-1]:
            rest = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            rest += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            rest += "Sec-WebSocket-Version: 13\r\n\r\n"
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, rest.encode())

        codes = await asyncio.wait_for(
            asyncio.gather(*(client.closed for client in clients)),
            timeout(SHUTDOWN_LIMIT),
        )
        last_close = max(client.closed_at for client in clients) - sigterm
        stuck_ends = [await read_to_eof(sock, SHUTDOWN_LIMIT) for sock in sockets[:-1]]
        status = await asyncio.to_thread(first.process.wait, timeout(SHUTDOWN_LIMIT))
        exited = time.monotonic() - sigterm
        slow_frames, _ = await slow.read_to_eof(SHUTDOWN_LIMIT)
        resumed = await asyncio.gather(*resumers)

        # The flow goes on a moment on G2 alone, then everyone must be level.
        await asyncio.sleep(1.0)
        stop.set()
        await publisher
        final = published[-1]

        async def everyone_level() -> bool:
            return all(c.offsets and c.offsets[-1] >= final for c in resumed)

        await wait_until(everyone_level, 10, f"every client at offset {final}")
        slow_id = str(slow.welcome["connectionId"])
        records = _records_of(shared_redis, [*ids, slow_id], [live, bulk])
    finally:
        stop.set()
        if publisher is not None:
            with contextlib.suppress(Exception):
                await publisher
        for sock in sockets:
            sock.close()
        for client in clients + resumed:
            client.close()

    assert readiness[-1] == 503, readiness
    assert new_upgrade in ("refused", "HTTP/1.1 503 Service Unavailable"), new_upgrade
    assert codes == [1001] * CLIENTS
    assert last_close <= timeout(SHUTDOWN_LIMIT), last_close
    for data, how in stuck_ends:
        assert how == "eof", (data, how)
        assert data == b"" or data.startswith(b"HTTP/1.1 503"), data
    assert status == 0
    assert exited <= timeout(SHUTDOWN_LIMIT), exited
    # Aborted at the deadline: the stream stops without the close frame, which
    # was still queued behind the events it never read.
    assert not any(frame.opcode == OP_CLOSE for frame in slow_frames)
    assert re.search(
        rf"connection {slow_id} closed: code 1001 .*aborted: no close reply",
        first.log(),
    ), first.log()[-2000:]
    assert records == [], records
    assert published == list(range(1, len(published) + 1))
    for before, after in zip(clients, resumed, strict=True):
        offsets = before.offsets + after.offsets
        assert offsets == list(range(1, final + 1)), (before.offsets, after.offsets)
        assert before.others == after.others == []
    for gateway in pair:
        assert_no_error_logged(gateway)
