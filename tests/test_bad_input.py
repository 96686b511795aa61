"""Bad input over real sockets: oversized and malformed frames, bad publishes.

Cases C05 and C06 of ``CASES.md`` run with a bystander subscriber (FlowProbe)
that must keep receiving every event without delay while another client
misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, RawWebSocket, client_frame
from support import (
    API_KEY,
    FlowProbe,
    Gateway,
    assert_no_error_logged,
    event,
    publish,
    read_metrics,
    running_gateway,
    timeout,
    wait_until,
    ws_client,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

KIB = 1024
MIB = 1024 * 1024
#: The gateway's default max_frame_bytes, the limit C05 is about.
MAX_FRAME = 65536


def padded_subscribe(topic: str, size: int) -> str:
    """A valid subscribe message of exactly ``size`` bytes, padded with spaces."""
    body = orjson.dumps({"op": "subscribe", "topics": [topic]})
    padding = size - len(body)
    assert padding >= 0
    return (body[:-1] + b" " * padding + b"}").decode()


async def expect_close(connection: ClientConnection, code: int) -> None:
    """Wait for the server to end the connection with close ``code``."""

    async def read_until_closed() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await connection.recv()
                raise AssertionError(f"unexpected message: {message!r}")

    await asyncio.wait_for(read_until_closed(), timeout(5))
    received = connection.protocol.close_rcvd
    assert received is not None, "the connection ended without a close frame"
    assert received.code == code, received


# C05: oversized frames and bodies.


async def test_c05_frames_over_the_limit_close_1009(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: a 65 KiB frame, one byte over the limit, or 1 MiB, gets close 1009."""
    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        for size in (65 * KIB, MAX_FRAME + 1, MIB):
            async with ws_client(gateway) as client:
                with contextlib.suppress(ConnectionClosed):
                    await client.connection.send(padded_subscribe(topic, size))
                await expect_close(client.connection, 1009)

        async def counted() -> bool:
            metrics = await read_metrics(http, gateway)
            # Three closes counted, and only the probe is left.
            closes = metrics.get('gateway_closes_total{code="1009"}')
            return closes == 3 and metrics["gateway_connections"] == 1

        await wait_until(counted, 5, "three 1009 closes counted")
    probe.assert_flowing()


async def test_c05_one_mib_message_in_64_fragments_closes_1009(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: 1 MiB sent as 64 fragments of 16 KiB gets close 1009, every time."""
    message = padded_subscribe(topic, MIB)
    size = MIB // 64

    def fragments() -> Iterator[str]:
        for start in range(0, MIB, size):
            yield message[start : start + size]

    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        # Three attempts: whether the close frame is lost to a reset depends on
        # timing, so one attempt could pass by luck.
        for _ in range(3):
            async with ws_client(gateway) as client:
                with contextlib.suppress(ConnectionClosed):
                    await client.connection.send(fragments())
                await expect_close(client.connection, 1009)
    probe.assert_flowing()


async def test_c05_oversized_message_is_refused_before_it_is_whole(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: 1009 comes after a 1 MiB frame's header, or after the fragment that
    passes the limit, without the rest of the message being sent."""
    size = 16 * KIB
    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        single = await RawWebSocket.opened(gateway.port, answer_pings=False)
        fragmented = await RawWebSocket.opened(gateway.port, answer_pings=False)
        try:
            # A header announcing 1 MiB and the first 16 KiB of its payload.
            await single.send(client_frame(OP_TEXT, b" " * size, length=MIB))
            single_close = await single.recv_close()
            # Four fragments make exactly the limit; the fifth passes it. The
            # other 59 of the 1 MiB message are never sent.
            await fragmented.send_frame(OP_TEXT, b" " * size, fin=False)
            for _ in range(4):
                await fragmented.send_frame(OP_CONT, b" " * size, fin=False)
            fragmented_close = await fragmented.recv_close()
        finally:
            single.close()
            fragmented.close()
    probe.assert_flowing()
    assert single_close.close_code == 1009
    assert fragmented_close.close_code == 1009


async def test_c05_endless_empty_fragments_close_1009_and_memory_holds(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: a text frame with fin=0 then 100,000 empty continuation frames gets
    close 1009 within a second, and the gateway's memory barely moves."""
    empty = client_frame(OP_CONT, b"", fin=False)
    flood = client_frame(OP_TEXT, b"{", fin=False) + empty * 100_000
    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        before = gateway.rss_bytes()
        client = await RawWebSocket.opened(gateway.port, answer_pings=False)
        try:
            started = asyncio.get_running_loop().time()
            sending = asyncio.create_task(client.send(flood))
            close = await client.recv_close()
            waited = asyncio.get_running_loop().time() - started
            # The gateway may end the connection before it has read the rest.
            with contextlib.suppress(OSError):
                await asyncio.wait_for(sending, timeout(5))
        finally:
            client.close()
        grown = gateway.rss_bytes() - before
    probe.assert_flowing()
    assert close.close_code == 1009
    assert b"fragment" in close.payload
    assert waited < timeout(1), waited
    assert grown < 4 * MIB, grown
    assert_no_error_logged(gateway)


async def test_c05_message_in_many_small_fragments_within_limit_is_accepted(
    gateway: Gateway, topic: str
) -> None:
    """C05: a subscribe split into 200 fragments, well under the limit with the
    per-fragment cost, is answered like one frame."""
    message = orjson.dumps({"op": "subscribe", "topics": [topic], "ref": 1})
    pieces = [message[n : n + 1] for n in range(len(message))]
    pieces += [b""] * (200 - len(pieces))
    client = await RawWebSocket.opened(gateway.port, answer_pings=False)
    try:
        frames = [client_frame(OP_TEXT, pieces[0], fin=False)]
        frames += [client_frame(OP_CONT, piece, fin=False) for piece in pieces[1:-1]]
        frames.append(client_frame(OP_CONT, pieces[-1]))
        await client.send(b"".join(frames))
        answer = await client.recv_json()
    finally:
        client.close()
    assert answer == {"type": "subscribed", "topics": [topic], "ref": 1}


async def test_c05_refused_sender_reads_1009_then_a_clean_end(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: a client still sending its 1 MiB frame gets close 1009 and then a
    clean end of stream, not a reset that could destroy the close frame."""
    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        client = await RawWebSocket.opened(gateway.port, answer_pings=False)
        try:
            frame = client_frame(OP_TEXT, padded_subscribe(topic, MIB).encode())
            sending = asyncio.create_task(client.send(frame))
            frames, how = await client.read_to_eof()
            # The gateway may stop reading once it has refused the frame, so
            # the rest of it need not be accepted.
            with contextlib.suppress(OSError):
                await asyncio.wait_for(sending, timeout(5))
        finally:
            client.close()
    probe.assert_flowing()
    assert [f.close_code for f in frames if f.opcode == OP_CLOSE] == [1009]
    assert how == "eof"


async def test_c05_60kib_frame_and_frame_at_limit_are_accepted(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: a 60 KiB subscribe frame and one of exactly max_frame_bytes both work."""
    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        async with ws_client(gateway) as client:
            for number, size in enumerate((60 * KIB, MAX_FRAME)):
                name = f"{topic}/{number}"
                await client.connection.send(padded_subscribe(name, size))
                assert await client.recv() == {"type": "subscribed", "topics": [name]}
                await publish(http, gateway, event(name, number))
                received = await client.events(1)
                assert received[0]["topic"] == name
    probe.assert_flowing()


async def test_c05_2mb_post_body_gets_413_naming_the_limit(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C05: a 2 MiB publish body gets a JSON 413 naming the limit, with or without
    a Content-Length."""
    body = b" " * (2 * MIB)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * KIB):
            yield body[start : start + 64 * KIB]

    async with FlowProbe(gateway, http, f"{topic}/probe") as probe:
        declared = await http.post(
            f"{gateway.http_url}/events", content=body, headers=headers
        )
        streamed = await http.post(
            f"{gateway.http_url}/events", content=chunked(), headers=headers
        )
    probe.assert_flowing()
    assert "content-length" not in streamed.request.headers
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "too_large"
        assert "1048576" in error["message"]


# C06: malformed messages while another client receives.


async def test_c06_bad_messages_get_errors_and_invalid_utf8_closes_1007(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """C06: four bad messages get named errors, binary is refused, the connection
    stays until invalid UTF-8 closes it with 1007; the bystander never stalls."""
    bad = {
        "truncated": b'{"op": "subscribe", "topics": ["sto',
        "array": b"[]",
        "dance": b'{"op":"dance"}',
        "string topics": orjson.dumps({"op": "subscribe", "topics": topic}),
    }
    async with FlowProbe(gateway, http, f"{topic}/b") as probe:
        a = await RawWebSocket.opened(gateway.port, answer_pings=False)
        try:
            errors = {}
            for name, payload in bad.items():
                await a.send_frame(OP_TEXT, payload)
                errors[name] = await a.recv_json()
                await a.send_json({"op": "ping", "ref": name})
                assert await a.recv_json() == {"type": "pong", "ref": name}
            await a.send_frame(OP_BINARY, b"\xff\xfe\x00")
            binary = await a.recv_json()
            await a.send_json({"op": "subscribe", "topics": [f"{topic}/a"]})
            subscribed = await a.recv_json()
            await publish(http, gateway, event(f"{topic}/a", 1))
            delivered = await a.recv_json()
            await a.send_frame(OP_TEXT, b'{"op": "ping", "ref": "\xff\xfe"}')
            close = await a.recv_close()
        finally:
            a.close()
    probe.assert_flowing()
    codes = {name: error["code"] for name, error in errors.items()}
    assert codes == {
        "truncated": "bad_json",
        "array": "bad_message",
        "dance": "unknown_op",
        "string topics": "bad_field",
    }
    assert all(error["type"] == "error" for error in errors.values())
    assert "JSON" in errors["truncated"]["message"]
    assert "object" in errors["array"]["message"]
    assert "dance" in errors["dance"]["message"]
    assert "topics" in errors["string topics"]["message"]
    assert (binary["type"], binary["code"]) == ("error", "binary_frame")
    assert subscribed == {"type": "subscribed", "topics": [f"{topic}/a"]}
    assert (delivered["type"], delivered["offset"]) == ("event", 1)
    assert close.close_code == 1007
    assert_no_error_logged(gateway)


# The publish API.


async def _post(
    http: httpx.AsyncClient, gateway: Gateway, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return await http.post(f"{gateway.http_url}/events", content=body, headers=headers)


def _outcome(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"] == "application/json", response.text
    return response.status_code, response.json()["error"]["code"]


def _envelope(topic: str, /, **changes: Any) -> bytes:
    # A good event with some fields replaced; a value of ... removes the field.
    item = {**event(topic), **changes}
    return orjson.dumps({k: v for k, v in item.items() if v is not ...})


KEY = {"Authorization": f"Bearer {API_KEY}"}

#: Refused publishes: name to (headers, body or a function of the topic that
#: makes it, expected status and error code, a word the message must hold).
REFUSED: dict[str, tuple[dict[str, str], Any, int, str, str]] = {
    # Credentials.
    "no header": ({}, _envelope, 401, "unauthorized", "bearer"),
    "wrong key": (
        {"Authorization": "Bearer not-the-key"},
        _envelope,
        401,
        "unauthorized",
        "key",
    ),
    "key prefix": (
        {"Authorization": f"Bearer {API_KEY[:-1]}"},
        _envelope,
        401,
        "unauthorized",
        "key",
    ),
    "empty bearer": ({"Authorization": "Bearer"}, _envelope, 401, "unauthorized", ""),
    "basic scheme": (
        {"Authorization": f"Basic {API_KEY}"},
        _envelope,
        401,
        "unauthorized",
        "",
    ),
    "no scheme": ({"Authorization": API_KEY}, _envelope, 401, "unauthorized", ""),
    # Not JSON.
    "truncated": (KEY, b'{"topic": "a", "eventSource": ', 400, "bad_json", "JSON"),
    "empty body": (KEY, b"", 400, "bad_json", "JSON"),
    "single quotes": (KEY, b"{'topic': 'a'}", 400, "bad_json", "JSON"),
    "trailing comma": (KEY, b'[{"topic": "a"},]', 400, "bad_json", "JSON"),
    "not utf-8": (KEY, b'{"topic": "\xff"}', 400, "bad_json", "JSON"),
    # Not an event.
    "empty array": (KEY, b"[]", 400, "bad_request", "empty"),
    "string body": (KEY, b'"hello"', 400, "bad_request", "object"),
    "number body": (KEY, b"3", 400, "bad_request", "object"),
    "array of numbers": (KEY, b"[1]", 400, "bad_request", "events[0]"),
}

#: Topics that break the grammar or its limits (256 characters, 8 levels).
BAD_TOPICS: dict[str, Any] = {
    "empty": "",
    "empty level": "a//b",
    "leading slash": "/a",
    "trailing slash": "a/",
    "plus": "+",
    "plus level": "a/+",
    "hash": "#",
    "hash level": "a/#",
    "nul": "a\x00b",
    "space": "a b",
    "dot dot": "..",
    "dot dot level": "a/../b",
    "10,000 characters": "x" * 10_000,
    "257 characters": "/".join(["a" * 64] * 3 + ["b" * 62]),
    "nine levels": "/".join(["a"] * 9),
    "level of 65": "a/" + "b" * 65,
    "non-ascii": "caf\u00e9",
    "number": 42,
    "null": None,
}
for _name, _bad in BAD_TOPICS.items():
    REFUSED[f"topic {_name}"] = (
        KEY,
        lambda topic, bad=_bad: _envelope(topic, topic=bad),
        400,
        "bad_topic",
        "topic",
    )

#: Envelope fields missing, unknown or ill-typed, with the field to be named.
BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "missing eventSource": ({"eventSource": ...}, "eventSource"),
    "missing eventType": ({"eventType": ...}, "eventType"),
    "missing eventDetails": ({"eventDetails": ...}, "eventDetails"),
    "missing topic": ({"topic": ...}, "topic"),
    "unknown field": ({"priority": 1}, "priority"),
    "camelCase type": ({"eventType": "priceChanged"}, "eventType"),
    "kebab type": ({"eventType": "PRICE-CHANGED"}, "eventType"),
    "leading underscore": ({"eventType": "_PRICE"}, "eventType"),
    "double underscore": ({"eventType": "PRICE__CHANGED"}, "eventType"),
    "trailing underscore": ({"eventType": "PRICE_"}, "eventType"),
    "empty type": ({"eventType": ""}, "eventType"),
    "type not string": ({"eventType": 5}, "eventType"),
    "type too long": ({"eventType": "A" * 65}, "eventType"),
    "details string": ({"eventDetails": "up"}, "eventDetails"),
    "details array": ({"eventDetails": [1, 2]}, "eventDetails"),
    "details null": ({"eventDetails": None}, "eventDetails"),
    "empty source": ({"eventSource": ""}, "eventSource"),
    "source not string": ({"eventSource": 7}, "eventSource"),
    "source too long": ({"eventSource": "s" * 129}, "eventSource"),
    "source with NUL": ({"eventSource": "feed\x00"}, "eventSource"),
    "source with newline": ({"eventSource": "feed\nERROR forged"}, "eventSource"),
}
for _name, (_changes, _field) in BAD_FIELDS.items():
    REFUSED[_name] = (
        KEY,
        lambda topic, changes=_changes: _envelope(topic, **changes),
        400,
        "bad_request",
        _field,
    )


async def test_refused_publishes_get_status_code_and_publish_nothing(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Each bad publish gets its JSON status and error code naming the problem,
    and none of them is delivered or uses an offset."""
    outcomes = {}
    messages = {}
    async with ws_client(gateway) as client:
        await client.subscribe(topic)
        for name, (headers, body, _, _, _) in REFUSED.items():
            content = body(topic) if callable(body) else body
            response = await _post(http, gateway, content, headers)
            outcomes[name] = _outcome(response)
            messages[name] = response.json()["error"]["message"]
            if response.status_code == 401:
                assert response.headers["www-authenticate"] == "Bearer"
        accepted = await publish(http, gateway, event(topic, 1))
        first = await client.recv()
    assert outcomes == {name: (s, c) for name, (_, _, s, c, _) in REFUSED.items()}
    for name, (_, _, _, _, word) in REFUSED.items():
        assert word.lower() in messages[name].lower(), (name, messages[name])
    assert accepted.json()["events"][0]["offset"] == 1
    assert (first["type"], first["offset"]) == ("event", 1)


async def test_publish_at_topic_length_and_depth_limits_is_accepted(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """A 256-character topic and an 8-level topic are accepted."""
    longest = "/".join(["a" * 64] * 3 + ["b" * 61])
    deepest = "/".join(["a"] * 8)
    assert len(longest) == 256
    response = await publish(http, gateway, [event(longest), event(deepest)])
    assert response.status_code == 200, response.text
    assert [e["topic"] for e in response.json()["events"]] == [longest, deepest]


async def test_refused_batches_publish_nothing_and_use_no_offset(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """An event over max_event_bytes (413), a batch over max_batch (413) or with
    one bad item (400) is refused whole: nothing delivered, no offset used."""
    huge = event(topic, 0, blob="x" * 70_000)
    bad = {**event(topic), "eventType": "oops"}
    async with ws_client(gateway) as client:
        await client.subscribe(topic)
        first = await publish(http, gateway, event(topic, 1))
        alone = await publish(http, gateway, huge)
        huge_in_batch = await publish(http, gateway, [event(topic, 2), huge])
        bad_in_batch = await publish(http, gateway, [event(topic, 3), bad])
        over_max = await publish(http, gateway, [event(topic, n) for n in range(1001)])
        at_max = await publish(http, gateway, [event(topic, n) for n in range(1000)])
        received = await client.events(1001)
    assert first.json()["events"][0]["offset"] == 1
    for response in (alone, huge_in_batch):
        assert _outcome(response) == (413, "too_large")
        assert "65536" in response.json()["error"]["message"]
    assert _outcome(bad_in_batch) == (400, "bad_request")
    assert "events[1]" in bad_in_batch.json()["error"]["message"]
    assert _outcome(over_max) == (413, "too_large")
    assert "1000" in over_max.json()["error"]["message"]
    assert at_max.status_code == 200
    assert [e["offset"] for e in at_max.json()["events"]] == list(range(2, 1002))
    assert [m["offset"] for m in received] == list(range(1, 1002))
    assert [m["eventDetails"]["n"] for m in received] == [1, *range(1000)]


# Bad WebSocket operations.


BAD_FILTERS = [
    "a/#/b",
    "a//b",
    "#/a",
    "a/b#",
    "a+/b",
    "/a",
    "a/",
    "",
    "a b",
    "a/\x00",
    "..",
    "x" * 300,
    "/".join(["a"] * 9),
]


async def test_bad_operations_get_error_frames_and_keep_the_connection(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Bad filters get bad_topic and ill-formed ops their own codes, each with
    the client's ref; the connection then still subscribes and receives."""
    operations: dict[str, tuple[Any, str]] = {
        f"filter {bad!r}"[:40]: (
            {"op": "subscribe", "topics": [topic, bad]},
            "bad_topic",
        )
        for bad in BAD_FILTERS
    }
    operations.update(
        {
            "unsubscribe bad filter": (
                {"op": "unsubscribe", "topics": ["a/#/b"]},
                "bad_topic",
            ),
            "no topics": ({"op": "subscribe"}, "bad_field"),
            "empty topics": ({"op": "subscribe", "topics": []}, "bad_field"),
            "topics string": ({"op": "subscribe", "topics": topic}, "bad_field"),
            "topic not string": ({"op": "subscribe", "topics": [5]}, "bad_topic"),
            "offsets array": (
                {"op": "subscribe", "topics": [topic], "offsets": [1]},
                "bad_field",
            ),
            "negative offset": (
                {"op": "subscribe", "topics": [topic], "offsets": {topic: -1}},
                "bad_field",
            ),
            "string offset": (
                {"op": "subscribe", "topics": [topic], "offsets": {topic: "3"}},
                "bad_field",
            ),
            "boolean offset": (
                {"op": "subscribe", "topics": [topic], "offsets": {topic: True}},
                "bad_field",
            ),
            "offset outside filters": (
                {"op": "subscribe", "topics": [topic], "offsets": {f"{topic}x": 1}},
                "bad_topic",
            ),
            "no op": ({"topics": [topic]}, "unknown_op"),
            "op number": ({"op": 5}, "unknown_op"),
            "op unknown": ({"op": "dance"}, "unknown_op"),
        }
    )
    async with ws_client(gateway) as client:
        answers = {}
        for ref, (name, (operation, _)) in enumerate(operations.items()):
            await client.send({**operation, "ref": ref})
            answers[name] = await client.recv()
        refless = {}
        for name, operation in {
            "ref too long": {"op": "ping", "ref": "r" * 65},
            "ref object": {"op": "ping", "ref": {}},
            "null": None,
            "string": "subscribe",
        }.items():
            await client.send(operation)
            refless[name] = await client.recv()
        await client.subscribe(f"{topic}/+")
        await publish(http, gateway, [event(topic, 1), event(f"{topic}/x", 2)])
        received = await client.recv()
    assert {name: (a["type"], a["code"], a["ref"]) for name, a in answers.items()} == {
        name: ("error", code, ref)
        for ref, (name, (_, code)) in enumerate(operations.items())
    }
    assert {name: (a["type"], a["code"]) for name, a in refless.items()} == {
        "ref too long": ("error", "bad_field"),
        "ref object": ("error", "bad_field"),
        "null": ("error", "bad_message"),
        "string": ("error", "bad_message"),
    }
    # A refused subscribe adds none of its filters, not even the valid one, so
    # the event on the topic itself never arrives.
    assert (received["topic"], received["offset"]) == (f"{topic}/x", 1)


async def test_subscription_limit_gets_limit_exceeded(
    tmp_path: Path, http: httpx.AsyncClient, topic: str, backend: str
) -> None:
    """With max_subscriptions=3 a fourth filter gets limit_exceeded; the
    connection stays and may swap a filter for another."""
    with running_gateway(tmp_path, max_subscriptions=3) as gateway:
        async with ws_client(gateway) as client:
            names = [f"{topic}/{n}" for n in range(5)]
            await client.subscribe(*names[:3])
            await client.send({"op": "subscribe", "topics": [names[3]], "ref": 4})
            fourth = await client.recv()
            await client.send({"op": "subscribe", "topics": names[1:5], "ref": 5})
            too_many_at_once = await client.recv()
            again = await client.subscribe(names[0])
            await publish(http, gateway, event(names[3], 1))
            await client.send({"op": "unsubscribe", "topics": [names[0]]})
            assert (await client.recv())["type"] == "unsubscribed"
            await client.subscribe(names[3])
            await publish(http, gateway, event(names[3], 2))
            received = await client.events(1)
    assert (fourth["type"], fourth["code"], fourth["ref"]) == (
        "error",
        "limit_exceeded",
        4,
    )
    assert (too_many_at_once["code"], too_many_at_once["ref"]) == ("limit_exceeded", 5)
    assert again["topics"] == [names[0]]
    assert (received[0]["topic"], received[0]["offset"]) == (names[3], 2)


async def test_message_rate_over_limit_closes_1008(
    tmp_path: Path, backend: str
) -> None:
    """With max_messages_per_second=5 a burst of 10 is answered; more closes 1008."""
    with running_gateway(tmp_path, max_messages_per_second=5) as gateway:
        client = await RawWebSocket.opened(gateway.port, answer_pings=False)
        try:
            burst = b"".join(
                client_frame(OP_TEXT, orjson.dumps({"op": "ping", "ref": n}))
                for n in range(10)
            )
            await client.send(burst)
            pongs = [await client.recv_json() for _ in range(10)]
            await client.send(burst)
            close = await client.recv_close()
            await client.send_frame(OP_CLOSE, close.payload[:2])
            _, how = await client.read_to_eof()
        finally:
            client.close()
        assert_no_error_logged(gateway)
    assert pongs == [{"type": "pong", "ref": n} for n in range(10)]
    assert close.close_code == 1008
    assert b"too many messages" in close.payload
    assert how == "eof"


async def test_unknown_paths_and_methods_get_404_and_405(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """A WebSocket upgrade anywhere but /ws gets 404, as does an unknown HTTP
    path (JSON) and a known one with a slash too many (not a redirect built from
    the Host header); GET /events gets 405; /ws with a query string is accepted."""
    statuses = {}
    for path in ("/", "/nope", "/ws/extra", "/WS", "/events"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{gateway.port}{path}"):
                pass
        statuses[path] = refused.value.response.status_code
        assert b"/ws" in refused.value.response.body
    wrong_method = await http.get(f"{gateway.http_url}/events")
    unknown = await http.get(f"{gateway.http_url}/nothing-here")
    slashed = [
        await http.post(f"{gateway.http_url}/jobs/", headers={"Host": "evil.test"}),
        await http.get(f"{gateway.http_url}/topics/stocks/AAPL/events/"),
    ]
    async with connect(f"{gateway.ws_url}?client=test") as connection:
        welcome = orjson.loads(await connection.recv())
    assert statuses == dict.fromkeys(statuses, 404)
    assert _outcome(wrong_method) == (405, "http_error")
    assert _outcome(unknown) == (404, "http_error")
    for response in slashed:
        assert _outcome(response) == (404, "http_error")
        assert "location" not in response.headers
    assert welcome["type"] == "welcome"


# Hostile messages while another client receives.


async def test_hostile_messages_get_errors_and_leave_peers_and_memory_alone(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """JSON nested 30,000 deep, a subscribe of 5,000 topics, hostile topic names
    and unknown fields each get a named error on a connection that stays open;
    nested event details get 400; a bystander never stalls and memory holds."""
    hostile_filters = ["a\x00b", "a/../b", "a b", "x" * 10_000, "caf\u00e9", "$SYS/#"]
    frames = {
        "nested arrays": b"[" * 30_000 + b"]" * 30_000,
        "nested objects": b'{"op":' * 5_000 + b"1" + b"}" * 5_000,
        "5,000 topics": orjson.dumps(
            {"op": "subscribe", "topics": [f"t/{n}" for n in range(5_000)]}
        ),
        "unknown field": orjson.dumps({"op": "ping", "please": True}),
        **{
            f"filter {bad[:12]!r}": orjson.dumps({"op": "subscribe", "topics": [bad]})
            for bad in hostile_filters
        },
    }
    envelope = orjson.dumps({**event(f"{topic}/b"), "eventDetails": "X"})
    nested_details = b'{"a":' * 2_000 + b"1" + b"}" * 2_000
    deep_body = envelope.replace(b'"X"', nested_details)
    async with FlowProbe(gateway, http, f"{topic}/b") as probe:
        before = gateway.rss_bytes()
        a = await RawWebSocket.opened(gateway.port, answer_pings=False)
        try:
            answers = {}
            for _ in range(3):
                for name, payload in frames.items():
                    await a.send_frame(OP_TEXT, payload)
                    answers[name] = await a.recv_json()
            await a.send_json({"op": "ping", "ref": "still"})
            pong = await a.recv_json()
        finally:
            a.close()
        deep = await publish(http, gateway, deep_body)
        grown = gateway.rss_bytes() - before
    probe.assert_flowing()
    codes = {name: answer.get("code") for name, answer in answers.items()}
    assert codes == {
        "nested arrays": "bad_json",
        "nested objects": "bad_json",
        "5,000 topics": "limit_exceeded",
        "unknown field": None,
        **{f"filter {bad[:12]!r}": "bad_topic" for bad in hostile_filters},
    }
    # An unknown field is ignored, so clients may add fields a later gateway reads.
    assert answers["unknown field"] == {"type": "pong"}
    assert pong == {"type": "pong", "ref": "still"}
    assert (deep.status_code, deep.json()["error"]["code"]) == (400, "bad_json")
    assert grown < 20 * 1024 * 1024, grown
    assert_no_error_logged(gateway)


# Request heads: too large, too slow, malformed.


async def _raw_request(port: int, head: bytes) -> bytes:
    """Send ``head`` on a new connection; return everything until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout(15))
    finally:
        writer.close()


async def test_streamed_header_is_refused_431_and_memory_holds(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A header streamed without end gets a JSON 431 once the head passes the
    limit, on HTTP and on a WebSocket upgrade; memory barely moves and /healthz
    answers meanwhile."""
    with running_gateway(tmp_path, max_header_bytes=16384) as gateway:
        before = gateway.rss_bytes()

        async def stream(path: str, upgrade: bool) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            head = f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode()
            if upgrade:
                head += b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            writer.write(head + b"X-Big: ")
            try:
                # Up to 50 MB, unless the gateway answers and closes first.
                for _ in range(800):
                    writer.write(b"a" * 65536)
                    await writer.drain()
            except ConnectionError:
                pass
            try:
                return await asyncio.wait_for(reader.read(), timeout(10))
            except ConnectionError:
                return b""
            finally:
                writer.close()

        answers = await asyncio.gather(
            stream("/healthz", False), stream("/ws", True), stream("/events", False)
        )
        health = await http.get(f"{gateway.http_url}/healthz")
        grown = gateway.rss_bytes() - before
        assert_no_error_logged(gateway)
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b'"code":"too_large"' in answer and b"16384" in answer
    assert health.status_code == 200
    assert grown < 10 * 1024 * 1024, grown


async def test_slow_head_gets_408_and_malformed_http_a_json_400(
    tmp_path: Path,
) -> None:
    """A head not finished within --header-timeout gets 408; malformed HTTP gets
    a JSON 400 and an h2c upgrade a plain answer, neither logged above DEBUG; an
    idle keep-alive connection is not hurt."""
    with running_gateway(tmp_path, header_timeout=1) as gateway:
        started = asyncio.get_running_loop().time()
        slow = await _raw_request(gateway.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        waited = asyncio.get_running_loop().time() - started
        malformed = await _raw_request(gateway.port, b"GARBAGE \x00\x01\r\n\r\n")
        h2c = await _raw_request(
            gateway.port,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n"
            b"Upgrade: h2c\r\n\r\n",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        await asyncio.sleep(1.5)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        kept = await asyncio.wait_for(reader.read(), timeout(5))
        writer.close()
        log = gateway.log()
        assert_no_error_logged(gateway)
    assert slow.startswith(b"HTTP/1.1 408 ") and b'"header_timeout"' in slow
    assert 0.9 < waited < timeout(5), waited
    assert malformed.startswith(b"HTTP/1.1 400 ") and b'"bad_http"' in malformed
    assert kept.startswith(b"HTTP/1.1 200 "), kept[:100]
    assert h2c.startswith(b"HTTP/1.1 200 "), h2c[:100]
    assert "Invalid HTTP request" not in log and "WARNING" not in log


async def test_malformed_upgrades_get_json_refusals(tmp_path: Path) -> None:
    """An upgrade with a bad version, no key or a malformed key is refused with
    the status websockets gives and the gateway's JSON body naming the header."""
    upgrade = (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    )
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    cases = {
        "version 8": key + "Sec-WebSocket-Version: 8\r\n",
        "no key": "Sec-WebSocket-Version: 13\r\n",
        "short key": "Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n",
    }
    with running_gateway(tmp_path) as gateway:
        answers = {
            name: await _raw_request(
                gateway.port, (upgrade + headers + "\r\n").encode()
            )
            for name, headers in cases.items()
        }
        assert_no_error_logged(gateway)
    for name, answer in answers.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"426"), (name, head)
        assert b"content-type: application/json" in head.lower(), (name, head)
        error = orjson.loads(body)["error"]
        assert error["code"] == "bad_handshake", (name, error)
        assert "Sec-WebSocket" in error["message"], (name, error)


def _upgrade_head(path: str = "/ws", extra: str = "") -> bytes:
    """A WebSocket upgrade request head with ``extra`` header lines."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def _status(answer: bytes) -> tuple[int, dict[str, Any]]:
    """The status of a raw HTTP answer, and its JSON error if it has a body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, orjson.loads(body)["error"] if body else {}


async def test_upgrade_with_10kb_token_or_many_headers_is_checked(
    tmp_path: Path,
) -> None:
    """A 10 KB token in the Authorization header or in access_token, and an
    upgrade with 300 headers, are checked like any other (101, or 401 for a bad
    token) instead of being refused as malformed."""
    secret = "a-shared-secret-of-at-least-32-characters"
    claims = {"sub": "fan-1", "exp": time.time() + 60, "topics": "#"}
    good = jwt.encode({**claims, "pad": "p" * 10_000}, secret, algorithm="HS256")
    bad = good[:-20] + "A" * 20
    assert len(good) > 10_000
    many = [(f"X-Header-{n}", str(n)) for n in range(300)]
    with running_gateway(tmp_path, jwt_secret=secret, anonymous_read="") as gateway:
        async with connect(
            gateway.ws_url, additional_headers={"Authorization": f"Bearer {good}"}
        ) as connection:
            by_header = orjson.loads(await connection.recv())
        async with connect(f"{gateway.ws_url}?access_token={good}") as connection:
            by_query = orjson.loads(await connection.recv())
        async with connect(
            f"{gateway.ws_url}?access_token={good}", additional_headers=many
        ) as connection:
            with_many = orjson.loads(await connection.recv())
        answers = {
            "bad header": await _raw_request(
                gateway.port, _upgrade_head(extra=f"Authorization: Bearer {bad}\r\n")
            ),
            "bad query": await _raw_request(
                gateway.port, _upgrade_head(f"/ws?access_token={bad}")
            ),
        }
        assert_no_error_logged(gateway)
    assert by_header["type"] == by_query["type"] == with_many["type"] == "welcome"
    assert _status(answers["bad header"])[0] == 401
    assert _status(answers["bad query"])[0] == 401


async def test_whole_head_over_limit_in_one_write_gets_431(gateway: Gateway) -> None:
    """A head over --max-header-bytes sent in one write gets a JSON 431, on an
    upgrade (70 KB) and on HTTP (a 100,000-byte Cookie); a small head followed
    by a 100 KB body in the same write is not held against the limit."""
    cookie = f"Cookie: c={'x' * 100_000}\r\n"
    answers = {
        "upgrade": await _raw_request(
            gateway.port, _upgrade_head(extra=f"X-Big: {'a' * 70_000}\r\n")
        ),
        "cookie": await _raw_request(
            gateway.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{cookie}\r\n".encode()
        ),
    }
    body = b" " * 100_000
    publish_head = (
        f"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with_body = await _raw_request(gateway.port, publish_head + body)
    for name, answer in answers.items():
        status, error = _status(answer)
        assert (status, error["code"]) == (431, "too_large"), (name, answer[:300])
        assert "65536" in error["message"], (name, error)
    status, error = _status(with_body)
    assert (status, error["code"]) == (400, "bad_json"), with_body[:300]
    assert_no_error_logged(gateway)
