"""Ingest stays responsive while a large fan-out runs, and the backlog is bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest
from rawws import OP_TEXT, client_frame, open_idle_client
from support import (
    event,
    publish,
    read_metrics,
    running_gateway,
    timeout,
    wait_until,
)

SUBSCRIBERS = 300
EVENTS = 500


@pytest.mark.timeout(120)
async def test_publisher_is_answered_before_a_large_fan_out_ends(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """One POST of 500 events for 300 subscribers is answered while delivery still
    runs, /healthz answers within 0.5 s meanwhile, and every frame arrives."""
    with running_gateway(tmp_path) as gateway:
        clients = []
        subscribe = client_frame(
            OP_TEXT, orjson.dumps({"op": "subscribe", "topics": [topic]})
        )
        for _ in range(SUBSCRIBERS):
            client = await open_idle_client(gateway.port)
            client.send_frame(subscribe)
            clients.append(client)
        await asyncio.gather(*(c.subscribed for c in clients))

        def delivered() -> int:
            return sum(len(c.frames) - 2 for c in clients)

        started = time.monotonic()
        response = await publish(
            http, gateway, [event(topic, n) for n in range(EVENTS)]
        )
        answered = time.monotonic() - started
        assert response.status_code == 200, response.text
        at_answer = delivered()
        backlog = (await read_metrics(http, gateway))["gateway_fanout_backlog"]

        probes = []
        while delivered() < SUBSCRIBERS * EVENTS:
            probe_start = time.monotonic()
            health = await http.get(f"{gateway.http_url}/healthz")
            assert health.status_code == 200
            probes.append(time.monotonic() - probe_start)
            assert time.monotonic() - started < timeout(60), "fan-out too slow"
            await asyncio.sleep(0.05)

        async def all_in() -> bool:
            return delivered() == SUBSCRIBERS * EVENTS

        await wait_until(all_in, 10, "every frame delivered")
        for client in clients:
            client.close()
    # The answer came before the fan-out was done, so the publisher did not wait:
    # events were still queued for delivery after it.
    assert backlog > 0, (answered, at_answer)
    assert at_answer < SUBSCRIBERS * EVENTS, (answered, at_answer)
    assert max(probes, default=0.0) < timeout(0.5), max(probes)
    offsets = [orjson.loads(f.payload)["offset"] for f in clients[-1].frames[2:]]
    assert offsets == list(range(1, EVENTS + 1))
