"""MQTT 3.1.1 byte by byte: the benchmark's subscriber, and the embedded broker.

The subscriber's tests feed it packets with no socket behind. The embedded broker
(``gateway broker``) gets raw packets over real sockets: the mistakes a client may
make, and what it must answer to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from services import EmbeddedBrokerServer
from support import timeout
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from clients._mqtt_wire import (
    MqttClient,
    connect_packet,
    decode_length,
    encode_length,
    encode_string,
    publish_packet,
    subscribe_packet,
)
from clients._wire import CLOSE_ABNORMAL, BenchError, Tally


class FakeTransport:
    """Keeps what the client writes; no socket behind it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closing = True


def event_payload(seq: int, sent_at: float) -> bytes:
    """An envelope as the gateway encodes it, with the benchmark's details."""
    return (
        b'{"type":"event","topic":"stocks/AAPL","offset":%d,"id":"x",'
        b'"publishedAt":"2026-12-03T00:00:00.000000Z","eventSource":"bench",'
        b'"eventType":"PRICE_CHANGED","eventDetails":{"sentAt":%r,"seq":%d,'
        b'"pad":"xx"}}' % (seq + 1, sent_at, seq)
    )


def publish(
    payload: bytes,
    *,
    topic: str = "stocks/AAPL",
    qos: int = 0,
    packet_id: int = 0,
    dup: bool = False,
    retain: bool = False,
) -> bytes:
    """A PUBLISH as a broker sends it."""
    first = 0x30 | dup << 3 | qos << 1 | int(retain)
    body = encode_string(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += payload
    return bytes([first]) + encode_length(len(body)) + body


async def connected_client(
    tally: Tally | None = None,
) -> tuple[MqttClient, FakeTransport]:
    """A client that sent its CONNECT and got a CONNACK accepting it."""
    client = MqttClient(tally or Tally(), keepalive=60)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(b"\x20\x02\x00\x00")
    await client.opened
    transport.written.clear()
    return client, transport


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_round_trip(length: int, encoded: bytes) -> None:
    """Remaining Length encodes as the specification's examples and decodes back."""
    assert encode_length(length) == encoded
    assert decode_length(b"\x30" + encoded + b"rest", 0) == (length, 1 + len(encoded))


def test_remaining_length_limits() -> None:
    """A cut field is incomplete, a fifth byte malformed, a huge length refused."""
    assert decode_length(b"\x30\x80", 0) == (-1, -1)
    with pytest.raises(ValueError, match="four bytes"):
        decode_length(b"\x30\xff\xff\xff\xff\x01", 0)
    with pytest.raises(ValueError, match="out of range"):
        encode_length(268_435_456)


def test_connect_packet() -> None:
    """CONNECT carries protocol MQTT level 4, a clean session and the keepalive."""
    assert connect_packet("c", keepalive=60) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c"
    )


def test_connect_packet_with_login() -> None:
    """User name and password set their flags and follow the client id."""
    packet = connect_packet("c", keepalive=5, username="u", password="p")
    assert packet[9] == 0x80 | 0x40 | 0x02
    assert packet.endswith(b"\x00\x01c\x00\x01u\x00\x01p")


def test_subscribe_and_publish_packets() -> None:
    """SUBSCRIBE has flags 0010 and one filter; PUBLISH at QoS 0 has no packet id."""
    assert subscribe_packet(7, "a/#", 1) == b"\x82\x08\x00\x07\x00\x03a/#\x01"
    assert publish_packet("a", b"", retain=True) == b"\x31\x03\x00\x01a"


async def test_connack_refused() -> None:
    """A CONNACK with a non-zero return code fails the connection, naming why."""
    client = MqttClient(Tally(), keepalive=60)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(b"\x20\x02\x00\x05")
    with pytest.raises(BenchError, match="not authorized"):
        await client.opened
    assert transport.aborted
    client.connection_lost(None)


async def test_qos0_event_split_across_reads() -> None:
    """An event arriving in pieces is counted once, with its latency."""
    tally = Tally()
    client, transport = await connected_client(tally)
    packet = publish(event_payload(0, time.perf_counter()))
    client.data_received(packet[:1])
    client.data_received(packet[1:20])
    assert tally.received == 0
    client.data_received(packet[20:] + packet)
    assert tally.received == 2
    assert tally.duplicates == 1
    assert len(tally.latencies) == 2 and 0 <= tally.latencies[0] < 1
    assert transport.written == []
    client.connection_lost(None)


async def test_qos1_acknowledged_once_per_read() -> None:
    """QoS 1 deliveries are acknowledged by packet id, all PUBACKs in one write."""
    tally = Tally()
    client, transport = await connected_client(tally)
    now = time.perf_counter()
    client.data_received(
        publish(event_payload(1, now), qos=1, packet_id=0x0102)
        + publish(event_payload(2, now), qos=1, packet_id=0x0304, dup=True)
    )
    assert transport.written == [b"\x40\x02\x01\x02\x40\x02\x03\x04"]
    assert tally.received == 2
    assert tally.marked_dup == 1
    client.connection_lost(None)


async def test_retained_message_not_counted() -> None:
    """A retained message sent on subscribing is acknowledged but not a delivery."""
    tally = Tally()
    client, transport = await connected_client(tally)
    client.data_received(
        publish(event_payload(0, 0.0), qos=1, packet_id=9, retain=True)
    )
    assert tally.received == 0
    assert tally.retained == 1
    assert transport.written == [b"\x40\x02\x00\x09"]
    client.connection_lost(None)


async def test_subscribe_granted_and_refused() -> None:
    """SUBACK resolves a subscription with the granted QoS; 0x80 refuses it."""
    client, transport = await connected_client()
    granted = asyncio.ensure_future(client.subscribe("stocks/#", 1))
    await asyncio.sleep(0)
    assert transport.written == [subscribe_packet(1, "stocks/#", 1)]
    client.data_received(b"\x90\x03\x00\x01\x01")
    assert await granted == 1
    refused = asyncio.ensure_future(client.subscribe("secret/#", 0))
    await asyncio.sleep(0)
    client.data_received(b"\x90\x03\x00\x02\x80")
    with pytest.raises(BenchError, match="refused a subscription"):
        await refused
    client.connection_lost(None)


async def test_qos2_publish_is_a_protocol_error() -> None:
    """A PUBLISH above the QoS subscribed to ends the connection."""
    client, transport = await connected_client()
    client.data_received(publish(b"{}", qos=2, packet_id=1))
    assert transport.aborted
    client.connection_lost(None)


async def test_broker_hang_up_counted() -> None:
    """A connection the broker ends counts as a lost socket; one this side ends not."""
    tally = Tally()
    client, _ = await connected_client(tally)
    client.connection_lost(ConnectionResetError())
    assert tally.closes == {CLOSE_ABNORMAL: 1}
    leaving, _ = await connected_client(tally)
    leaving.abort()
    leaving.connection_lost(None)
    assert tally.closes == {CLOSE_ABNORMAL: 1}


# The embedded broker's answers to raw packets.

SUBACK_FAILURE = 0x80
DISCONNECT = b"\xe0\x00"


def subscribe_many(packet_id: int, pairs: list[tuple[bytes | str, int]]) -> bytes:
    """One SUBSCRIBE of every (filter, requested QoS byte) pair, as given."""
    body = packet_id.to_bytes(2, "big")
    body += b"".join(encode_string(name) + bytes([qos]) for name, qos in pairs)
    return b"\x82" + encode_length(len(body)) + body


def unsubscribe_packet(packet_id: int, topic_filter: str) -> bytes:
    """UNSUBSCRIBE from one filter; its fixed-header flags are 0010."""
    body = packet_id.to_bytes(2, "big") + encode_string(topic_filter)
    return b"\xa2" + encode_length(len(body)) + body


class RawConnection:
    """An MQTT connection to a broker on which the test writes and reads bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self._packet_ids = iter(range(1, 65536))

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, port: int, client_id: str) -> AsyncIterator[RawConnection]:
        """Connect (clean session) and read the CONNACK accepting it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = cls(reader, writer)
        try:
            writer.write(connect_packet(client_id, keepalive=60))
            connack = await asyncio.wait_for(reader.readexactly(4), timeout(5))
            assert connack == b"\x20\x02\x00\x00", connack
            yield connection
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def subscribe(self, pairs: list[tuple[bytes | str, int]]) -> list[int]:
        """Send one SUBSCRIBE and return the SUBACK's return codes."""
        packet_id = next(self._packet_ids)
        self.writer.write(subscribe_many(packet_id, pairs))
        return await self.suback(packet_id)

    async def suback(self, packet_id: int) -> list[int]:
        """The return codes of the SUBACK with ``packet_id``, the next packet."""
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout(5))
        assert head[0] == 0x90, head
        length, at = decode_length(head, 0)
        if length < 0:
            head += await self.reader.readexactly(3)
            length, at = decode_length(head, 0)
        body = head[at:] + await self.reader.readexactly(length - len(head) + at)
        assert int.from_bytes(body[:2], "big") == packet_id
        return list(body[2:])

    async def unsubscribe(self, topic_filter: str) -> None:
        """Send one UNSUBSCRIBE and read its UNSUBACK."""
        packet_id = next(self._packet_ids)
        self.writer.write(unsubscribe_packet(packet_id, topic_filter))
        unsuback = await asyncio.wait_for(self.reader.readexactly(4), timeout(5))
        assert unsuback == b"\xb0\x02" + packet_id.to_bytes(2, "big"), unsuback

    async def closed_by_broker(self) -> bytes:
        """Whatever the broker sends before it closes the connection."""
        received = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(timeout(5)):
                while data := await self.reader.read(65536):
                    received += data
        return received


def loud_lines(broker: EmbeddedBrokerServer) -> list[str]:
    """The broker's log lines above INFO, and tracebacks."""
    return [
        line
        for line in broker.log().splitlines()
        if re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL)\b", line) or "Traceback" in line
    ]


@pytest.fixture(scope="module")
def embedded_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedBrokerServer]:
    """One ``gateway broker`` on free ports for the tests of this module."""
    broker = EmbeddedBrokerServer(tmp_path_factory.mktemp("broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([("stocks/AAPL", 7)], id="qos-7"),
        pytest.param([("stocks/AAPL", 3)], id="qos-3"),
        pytest.param([("stocks/AAPL", 1), ("stocks/MSFT", 0x81)], id="reserved-bit"),
        pytest.param([("stocks/\x00", 1)], id="nul"),
        pytest.param([("", 1)], id="empty-filter"),
        pytest.param([(b"stocks/\xff\xfe", 1)], id="not-utf8"),
        pytest.param([], id="no-filter"),
    ],
)
async def test_embedded_broker_closes_the_connection_for_a_malformed_subscribe(
    embedded_broker: EmbeddedBrokerServer, pairs: list[tuple[bytes | str, int]]
) -> None:
    """A SUBSCRIBE breaking MQTT 3.1.1 ends the connection, unanswered and quietly."""
    async with RawConnection.open(embedded_broker.port, "malformed") as raw:
        raw.writer.write(subscribe_many(1, pairs))
        assert await raw.closed_by_broker() == b""
    # The broker still serves everyone else.
    async with RawConnection.open(embedded_broker.port, "after") as raw:
        assert await raw.subscribe([("stocks/AAPL", 1)]) == [1]
    assert loud_lines(embedded_broker) == []


async def test_embedded_broker_limits_subscriptions_per_client(
    embedded_broker: EmbeddedBrokerServer,
) -> None:
    """Filters past 100 a client holds get 0x80; a SUBSCRIBE of over 100 closes."""
    async with RawConnection.open(embedded_broker.port, "collector") as raw:
        for n in range(100):
            assert await raw.subscribe([(f"stocks/S{n}", 1)]) == [1]
        assert await raw.subscribe([("stocks/S100", 1)]) == [SUBACK_FAILURE]
        # A filter already held counts once, and the connection went on.
        assert await raw.subscribe([("stocks/S7", 0), ("stocks/S101", 1)]) == [
            0,
            SUBACK_FAILURE,
        ]
        await raw.unsubscribe("stocks/S0")
        assert await raw.subscribe([("stocks/S101", 1), ("stocks/S102", 1)]) == [
            1,
            SUBACK_FAILURE,
        ]
    # The limit is per client: the next one starts from nothing.
    async with RawConnection.open(embedded_broker.port, "collector") as raw:
        assert (
            await raw.subscribe([(f"teams/T{n}", 1) for n in range(100)]) == [1] * 100
        )
        many = [(f"teams/U{n}", 1) for n in range(101)]
        raw.writer.write(subscribe_many(2, many))
        assert await raw.closed_by_broker() == b""
    assert loud_lines(embedded_broker) == []


async def _make_client_mistakes(broker: EmbeddedBrokerServer) -> None:
    """Connections that end before CONNECT, bad bytes, refusals, a second CONNECT."""
    for port, data in [
        (broker.port, b""),
        (broker.port, b"GET / HTTP/1.1\r\n\r\n"),
        (broker.port, b"\x10\xff\xff\xff\xff\x01"),
        (broker.ws_port, b""),
        (broker.ws_port, b"GET /mqtt HTTP/1.1\r\n\r\n"),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(reader.read(1024), 0.5)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    # A WebSocket client that leaves after the handshake, before its CONNECT.
    uri = f"ws://127.0.0.1:{broker.ws_port}/mqtt"
    async with ws_connect(uri, subprotocols=[Subprotocol("mqtt")]):
        pass
    async with RawConnection.open(broker.port, "mistaken") as raw:
        refused = [("secret/x", 1), ("#", 1), ("jobs/+", 1), ("$SYS/#", 0)]
        assert await raw.subscribe(refused) == [SUBACK_FAILURE] * 4
        raw.writer.write(publish_packet("stocks/AAPL", b"fake"))
        raw.writer.write(b"\x40\x02\x12\x34")  # a PUBACK for nothing sent
        raw.writer.write(connect_packet("again", keepalive=60))
        await raw.closed_by_broker()
    wrong_login = connect_packet(
        "intruder", keepalive=60, username="admin", password="x"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(wrong_login)
    assert await asyncio.wait_for(reader.read(4), timeout(5)) == b"\x20\x02\x00\x05"
    writer.close()
    await writer.wait_closed()


async def test_embedded_broker_logs_client_mistakes_at_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client mistakes log no ERROR, WARNING or INFO line, only DEBUG when it is on."""
    for level in ("info", "debug"):
        monkeypatch.setenv("GATEWAY_LOG_LEVEL", level)
        broker = EmbeddedBrokerServer(tmp_path / level)
        broker.start()
        try:
            await _make_client_mistakes(broker)
            # Sent after the mistakes: once it is answered, they were handled.
            async with RawConnection.open(broker.port, "last") as raw:
                assert await raw.subscribe([("stocks/AAPL", 1)]) == [1]
        finally:
            broker.stop()
        log = broker.log()
        assert not re.search(
            r"^\S+ \S+ (WARNING|ERROR|CRITICAL|INFO +(amqtt|websockets))\b", log, re.M
        ), log
        # The broker's one line at INFO is where it listens.
        infos = re.findall(r"^\S+ \S+ INFO +gateway\.broker: (.*) on ", log, re.M)
        assert infos == ["embedded MQTT broker"], log
        if level == "info":
            assert "Traceback" not in log, log
        else:
            # At DEBUG, a broken handshake keeps websockets' traceback.
            for line in (
                "No data from",
                "opening handshake failed",
                "refused a subscription to '#'",
            ):
                assert re.search(rf"DEBUG +\S+: {re.escape(line)}", log), (line, log)
