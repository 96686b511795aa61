"""Publish over HTTP and receive over WebSocket, against a running gateway."""

from __future__ import annotations

import httpx
from support import Gateway, event, publish, ws_client


async def test_published_events_arrive_in_order_with_offsets(
    gateway: Gateway, http: httpx.AsyncClient, topic: str
) -> None:
    """A subscriber gets each event once, in order, with contiguous offsets."""
    async with ws_client(gateway) as client:
        await client.subscribe(topic)
        response = await publish(http, gateway, [event(topic, n) for n in range(5)])
        assert response.status_code == 200
        answer = response.json()["events"]
        received = await client.events(5)
    assert [e["offset"] for e in received] == [1, 2, 3, 4, 5]
    assert [e["id"] for e in received] == [a["id"] for a in answer]
    assert [e["eventDetails"]["n"] for e in received] == list(range(5))
    assert all(e["topic"] == topic and e["publishedAt"].endswith("Z") for e in received)
