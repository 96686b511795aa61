"""The benchmark's MQTT 3.1.1 subscriber: packets in and out, bytes only."""

from __future__ import annotations

import asyncio
import time

import pytest

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
