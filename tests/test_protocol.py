"""The WebSocket protocol over real sockets: subscribe, wildcards, resume, gaps.

With the Redis backend an event reaches subscribers after the publish request
has returned, so "nothing else arrived" is shown by publishing one more event
that the client does receive: it comes after anything published before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
from rawws import RawWebSocket
from support import (
    READ_ALL,
    Gateway,
    WsClient,
    admin_stats,
    event,
    messages_before_pong,
    publish,
    running_gateway,
    timeout,
    wait_until,
    ws_client,
)


async def _publish_ids(
    http: httpx.AsyncClient, gateway: Gateway, items: list[dict[str, Any]]
) -> list[str]:
    response = await publish(http, gateway, items)
    assert response.status_code == 200, response.text
    return [answer["id"] for answer in response.json()["events"]]


async def _messages_through(client: WsClient, last_id: str) -> list[dict[str, Any]]:
    # Every message up to and including the event with id last_id.
    messages = []
    while not messages or messages[-1].get("id") != last_id:
        messages.append(await client.recv())
    return messages


async def _offsets_until(client: WsClient, last: int) -> list[int]:
    # Offsets of the events received until offset last, or until none has come
    # for a while: a hole then shows as a short list rather than a timeout.
    offsets: list[int] = []
    with contextlib.suppress(TimeoutError):
        while not offsets or offsets[-1] < last:
            offsets.append((await client.recv(2))["offset"])
    return offsets


async def test_welcome_then_answers_echo_topics_and_ref(
    gateway: Gateway, topic: str
) -> None:
    """The welcome names connection and limits; each op is answered with its ref."""
    async with ws_client(gateway) as client:
        await client.send({"op": "subscribe", "topics": [topic], "ref": "s1"})
        subscribed = await client.recv()
        await client.send({"op": "unsubscribe", "topics": [topic], "ref": 7})
        unsubscribed = await client.recv()
        await client.send({"op": "ping", "ref": "p"})
        pong = await client.recv()
        await client.send({"op": "ping"})
        bare_pong = await client.recv()
    welcome = client.welcome
    assert len(welcome["connectionId"]) == 32
    assert welcome["pingInterval"] == 20.0
    assert welcome["limits"] == {
        "maxFrameBytes": 65536,
        "maxSubscriptions": 100,
        "maxMessagesPerSecond": 50.0,
        "maxBufferBytes": 1024 * 1024,
    }
    assert subscribed == {"type": "subscribed", "topics": [topic], "ref": "s1"}
    assert unsubscribed == {"type": "unsubscribed", "topics": [topic], "ref": 7}
    assert pong == {"type": "pong", "ref": "p"}
    assert bare_pong == {"type": "pong"}


async def test_subscribers_get_identical_bytes_matching_the_publish_answer(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Two subscribers receive the same bytes per event, with the answer's ids."""
    async with ws_client(gateway) as first, ws_client(gateway) as second:
        await first.subscribe(topic)
        await second.subscribe(topic)
        response = await publish(http, gateway, [event(topic, n) for n in range(3)])
        assert response.status_code == 200
        answer = response.json()["events"]
        raw_first = [await first.connection.recv() for _ in range(3)]
        raw_second = [await second.connection.recv() for _ in range(3)]
    assert raw_first == raw_second
    assert [a["offset"] for a in answer] == [1, 2, 3]
    assert all(a["topic"] == topic and len(a["id"]) == 32 for a in answer)
    assert len({a["id"] for a in answer}) == 3
    for raw, published in zip(raw_first, answer, strict=True):
        assert isinstance(raw, str)
        assert f'"id":"{published["id"]}"' in raw
        assert f'"offset":{published["offset"]},' in raw


async def test_unsubscribe_stops_delivery_and_resubscribe_starts_afresh(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """After unsubscribe nothing more arrives; subscribing again brings only
    events published from then on."""
    other = f"{topic}/other"
    async with ws_client(gateway) as client:
        await client.subscribe(topic, other)
        await publish(http, gateway, event(topic, 1))
        assert (await client.events(1))[0]["offset"] == 1
        await client.send({"op": "unsubscribe", "topics": [topic]})
        assert (await client.recv())["type"] == "unsubscribed"
        # Operations are handled in order: once the ping is answered, the
        # unsubscribe has been carried out in the backend as well.
        assert await messages_before_pong(client) == []
        await publish(http, gateway, [event(topic, 2), event(other, 3)])
        after_unsubscribe = await client.recv()
        await client.subscribe(topic)
        await publish(http, gateway, event(topic, 4))
        after_resubscribe = await client.recv()
    assert (after_unsubscribe["topic"], after_unsubscribe["offset"]) == (other, 1)
    assert (after_resubscribe["topic"], after_resubscribe["offset"]) == (topic, 3)


async def test_wildcards_match_as_in_mqtt(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """``+`` matches exactly one level; ``#`` matches its parent and all below."""
    published = {
        f"{topic}/AAPL/price": True,
        f"{topic}/AAPL/volume": False,
        f"{topic}/AAPL/x/price": False,
        f"{topic}/price": False,
        f"{topic}/feeds": True,
        f"{topic}/feedsX": False,
        f"{topic}/other/feeds": False,
        f"{topic}/feeds/a/b/c": True,
        f"{topic}/MSFT/price": True,
    }
    async with ws_client(gateway) as client:
        await client.subscribe(f"{topic}/+/price", f"{topic}/feeds/#")
        ids = await _publish_ids(
            http, gateway, [event(name, n) for n, name in enumerate(published)]
        )
        received = await _messages_through(client, ids[-1])
    assert [m["topic"] for m in received] == [
        name for name, matches in published.items() if matches
    ]


async def _publish_c07_round(
    http: httpx.AsyncClient, gateway: Gateway, round_number: int
) -> list[str]:
    # 100 events to stocks/AAPL and 10 to teams/ARG, as in C07; returns their ids.
    items = [event("stocks/AAPL", n, round=round_number) for n in range(100)]
    items += [event("teams/ARG", n, round=round_number) for n in range(10)]
    return await _publish_ids(http, gateway, items)


async def test_c07_overlapping_filters_deliver_each_event_once(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """C07: overlapping filters give one frame per event, until all are dropped.

    The gateway of this test is its own process, so the literal topics of the
    case (and ``#``) see no event from any other test. Its clients without a
    token may read everything, ``#`` included.
    """
    with running_gateway(tmp_path, anonymous_read=READ_ALL) as gateway:
        await _c07_rounds(gateway, http)


async def _c07_rounds(gateway: Gateway, http: httpx.AsyncClient) -> None:
    async with ws_client(gateway) as client:
        await client.subscribe("stocks/+", "stocks/AAPL", "#")

        ids = await _publish_c07_round(http, gateway, 1)
        first_round = await client.events(110)

        await client.send({"op": "unsubscribe", "topics": ["stocks/AAPL"]})
        assert (await client.recv())["type"] == "unsubscribed"
        ids += await _publish_c07_round(http, gateway, 2)
        second_round = await client.events(110)

        await client.send(
            {"op": "unsubscribe", "topics": ["stocks/+", "stocks/AAPL", "#"]}
        )
        assert (await client.recv())["type"] == "unsubscribed"
        await client.subscribe("marker")
        await _publish_c07_round(http, gateway, 3)
        marker = await _publish_ids(http, gateway, [event("marker")])
        after_unsubscribing_all = await _messages_through(client, marker[0])
    assert [m["id"] for m in first_round + second_round] == ids
    assert [m["topic"] for m in after_unsubscribing_all] == ["marker"]


async def test_resume_replays_after_offset_then_goes_live(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Offsets {topic: 4} replay 5..10 in order then live events, none twice;
    offset 0 replays all and the last offset replays nothing."""
    await publish(http, gateway, [event(topic, n) for n in range(1, 11)])
    async with ws_client(gateway) as client, ws_client(gateway) as current:
        await client.subscribe(topic, offsets={topic: 4})
        replayed = await client.events(6)
        await current.subscribe(topic, offsets={topic: 10})
        await publish(http, gateway, [event(topic, n) for n in range(11, 14)])
        live = await client.events(3)
        current_live = await current.events(3)
        async with ws_client(gateway) as fresh:
            await fresh.subscribe(topic, offsets={topic: 0})
            everything = await fresh.events(13)
            await publish(http, gateway, event(topic, 14))
            next_after = [await c.recv() for c in (client, current, fresh)]
    assert [m["offset"] for m in replayed] == [5, 6, 7, 8, 9, 10]
    assert [m["eventDetails"]["n"] for m in replayed] == [5, 6, 7, 8, 9, 10]
    assert [m["offset"] for m in live] == [11, 12, 13]
    assert [m["offset"] for m in current_live] == [11, 12, 13]
    assert [m["offset"] for m in everything] == list(range(1, 14))
    assert [m["offset"] for m in next_after] == [14, 14, 14]


async def test_resume_through_wildcard_filter(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Offsets may name a topic that one of the subscribed wildcard filters matches."""
    name = f"{topic}/AAPL"
    await publish(http, gateway, [event(name, n) for n in range(1, 6)])
    async with ws_client(gateway) as client:
        await client.subscribe(f"{topic}/+", offsets={name: 2})
        replayed = await client.events(3)
        await publish(http, gateway, [event(f"{topic}/MSFT", 9), event(name, 6)])
        live = await client.events(2)
    assert [(m["topic"], m["offset"]) for m in replayed + live] == [
        (name, 3),
        (name, 4),
        (name, 5),
        (f"{topic}/MSFT", 1),
        (name, 6),
    ]


async def test_reconnecting_client_resumes_where_it_left_off(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """A client that reconnects with its last offset misses nothing, repeats nothing."""
    async with ws_client(gateway) as client:
        await client.subscribe(topic)
        await publish(http, gateway, [event(topic, n) for n in range(1, 6)])
        seen = [m["offset"] for m in await client.events(5)]

    async def unregistered() -> bool:
        stats = await admin_stats(http, gateway)
        return bool(stats["connections"] == 0)

    # Events 6 to 8 are published once the first connection is gone.
    await wait_until(unregistered, 5, "first connection unregistered")
    await publish(http, gateway, [event(topic, n) for n in range(6, 9)])
    async with ws_client(gateway) as client:
        await client.subscribe(topic, offsets={topic: seen[-1]})
        seen += [m["offset"] for m in await client.events(3)]
        await publish(http, gateway, [event(topic, 9), event(topic, 10)])
        seen += [m["offset"] for m in await client.events(2)]
    assert seen == list(range(1, 11))


async def test_resume_while_publishing_has_no_gap_or_duplicate(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Events published during the replay follow it exactly once, in order."""
    total = 400
    halfway = asyncio.Event()

    async def publisher() -> None:
        for n in range(1, total + 1):
            response = await publish(http, gateway, event(topic, n))
            assert response.status_code == 200
            if n == 50:
                halfway.set()

    async with ws_client(gateway) as client:
        task = asyncio.create_task(publisher())
        try:
            await asyncio.wait_for(halfway.wait(), timeout(10))
            await client.subscribe(topic, offsets={topic: 10})
            offsets = []
            while not offsets or offsets[-1] < total:
                offsets.append((await client.recv())["offset"])
        finally:
            await task
        await publish(http, gateway, event(topic, total + 1))
        offsets.append((await client.recv())["offset"])
    assert offsets == list(range(11, total + 2))


async def test_resume_older_than_history_reports_gap_then_all_that_is_kept(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """With history_size=5, an offset before the kept range gets a gap message,
    then every kept event up to the newest: never a silent hole.

    A backend may keep more than history_size (Redis trims approximately), so
    the first kept offset F is learned from the answer, not assumed.
    """
    total = 300
    with running_gateway(tmp_path, history_size=5) as gateway:
        await publish(http, gateway, [event(topic, n) for n in range(1, total + 1)])
        async with ws_client(gateway) as client:
            await client.subscribe(topic, offsets={topic: 3})
            gap = await client.recv()
            assert gap["type"] == "gap", gap
            first_kept = gap["toOffset"] + 1
            kept = await _offsets_until(client, total)
            async with ws_client(gateway) as other:
                await other.subscribe(topic, offsets={topic: first_kept - 2})
                boundary_gap = await other.recv()
            async with ws_client(gateway) as other:
                await other.subscribe(topic, offsets={topic: first_kept - 1})
                no_gap = await other.recv()
            await publish(http, gateway, event(topic, total + 1))
            live = await client.events(1)
    assert (gap["topic"], gap["fromOffset"]) == (topic, 4)
    assert 4 < first_kept <= total - 4
    assert kept == list(range(first_kept, total + 1))
    assert live[0]["offset"] == total + 1
    assert boundary_gap["type"] == "gap"
    assert (boundary_gap["fromOffset"], boundary_gap["toOffset"]) == (
        first_kept - 1,
        first_kept - 1,
    )
    assert (no_gap["type"], no_gap["offset"]) == ("event", first_kept)


async def test_subscribe_cut_by_reset_leaves_other_subscribers_alone(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """Clients that subscribe to a new filter and a topic another client holds,
    then reset the connection mid-subscribe, never stop that client's events."""
    shared = f"{topic}/y/2"
    rng = random.Random(2)
    async with ws_client(gateway) as holder:
        await holder.subscribe(shared)
        for number in range(150):
            client = await RawWebSocket.opened(gateway.port, answer_pings=False)
            try:
                filters = [f"{topic}/new/{number}/+", shared]
                await client.send_json({"op": "subscribe", "topics": filters})
                # The fault injected: a reset at a random point of the
                # subscribe, often while the backend is watching the new filter.
                await asyncio.sleep(rng.uniform(0, 0.005))
                client.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            finally:
                client.close()
        await publish(http, gateway, event(shared, 1))
        received = await holder.events(1)
    assert (received[0]["topic"], received[0]["offset"]) == (shared, 1)
