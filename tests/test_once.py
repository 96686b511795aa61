"""Publishing at most once per key, on both backends, through a Redis freeze."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import REDIS_URL
from services import RedisServer, SilentProxy
from support import (
    API_KEY,
    Gateway,
    assert_no_error_logged,
    event,
    running_gateway,
    start_gateway,
    timeout,
    ws_client,
)
from test_webhooks import SECRET, deliver, payload, sign

from gateway.errors import Unavailable
from gateway.events.envelope import Draft
from gateway.state.base import AlreadyPublished, Once, StateBackend
from gateway.state.memory import MemoryBackend
from gateway.state.redis import RedisBackend

DRAFTS = [
    Draft("a/b", "s", "X_HAPPENED", {"n": 1}),
    Draft("a/c", "s", "X_HAPPENED", {}),
]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateBackend]:
    """A started backend of each kind; the Redis one under a fresh key prefix."""
    store: StateBackend
    if request.param == "memory":
        store = MemoryBackend()
    else:
        prefix = f"test:once:{uuid.uuid4().hex[:8]}:"
        store = RedisBackend(REDIS_URL, prefix=prefix, replica="once-test")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_a_key_publishes_once_and_repeats_tell_the_first_events(
    store: StateBackend,
) -> None:
    """The second publish with a key stores nothing and names the first's events
    and fingerprint; another key publishes."""
    once = Once(f"k-{uuid.uuid4().hex}", "body-hash", ttl=60)
    first = await store.publish(DRAFTS, max_bytes=10_000, once=once)
    with pytest.raises(AlreadyPublished) as repeat:
        await store.publish(DRAFTS[:1], max_bytes=10_000, once=once)
    other = await store.publish(
        DRAFTS[:1], max_bytes=10_000, once=Once(f"k-{uuid.uuid4().hex}", "", ttl=60)
    )
    assert [(r.id, r.topic, r.offset) for r in repeat.value.events] == [
        (e.id, e.topic, e.offset) for e in first
    ]
    assert repeat.value.fingerprint == "body-hash"
    read = await store.read_history("a/b", 0, 10)
    assert [e.offset for e in read.events] == [1, 2]
    assert other[0].offset == 2


async def test_a_key_is_forgotten_after_its_time() -> None:
    """Past its time to live a key publishes again; the memory backend keeps
    at most its cap of keys."""
    now = [0.0]
    backend = MemoryBackend(max_once_keys=2, clock=lambda: now[0])
    await backend.publish(DRAFTS[:1], max_bytes=10_000, once=Once("a", "", ttl=10))
    now[0] = 11.0
    await backend.publish(DRAFTS[:1], max_bytes=10_000, once=Once("a", "", ttl=10))
    for key in ("b", "c"):
        await backend.publish(DRAFTS[:1], max_bytes=10_000, once=Once(key, "", ttl=99))
    # 'a' was the oldest of three: forgotten early, so it publishes again.
    events = await backend.publish(DRAFTS[:1], max_bytes=10_000, once=Once("a", "", 9))
    assert events[0].offset == 5


async def test_redis_key_expires(tmp_path: Path) -> None:
    """Redis forgets a key after its time to live."""
    prefix = f"test:once:{uuid.uuid4().hex[:8]}:"
    backend = RedisBackend(REDIS_URL, prefix=prefix, replica="once-test")
    await backend.start()
    try:
        once = Once("short", "", ttl=0.2)
        await backend.publish(DRAFTS[:1], max_bytes=10_000, once=once)
        await asyncio.sleep(0.4)
        again = await backend.publish(DRAFTS[:1], max_bytes=10_000, once=once)
    finally:
        await backend.close()
    assert again[0].offset == 2


@pytest.mark.timeout(60)
async def test_a_retry_after_a_lost_answer_stores_nothing_twice(tmp_path: Path) -> None:
    """Redis runs a publish but its answer is lost: the publisher gets
    Unavailable, the retry with the same key is told what the first stored,
    and the topic holds the event once."""
    server = RedisServer(tmp_path)
    server.start()
    proxy = SilentProxy(server.port)
    await proxy.start()
    backend = RedisBackend(
        f"redis://127.0.0.1:{proxy.port}/0", prefix="once:", replica="once-test"
    )
    await backend.start()
    try:
        # The first call loads the script; from then on a publish is one EVALSHA.
        await backend.publish(DRAFTS[1:], max_bytes=10_000)
        once = Once("lost", "fp", ttl=60)
        proxy.drop_replies()
        with pytest.raises(Unavailable, match="answer was lost"):
            await backend.publish(DRAFTS[:1], max_bytes=10_000, once=once)
        proxy.pass_replies()
        with pytest.raises(AlreadyPublished) as repeat:
            await backend.publish(DRAFTS[:1], max_bytes=10_000, once=once)
        read = await backend.read_history("a/b", 0, 10)
    finally:
        await backend.close()
        await proxy.close()
        server.stop()
    assert [(e.topic, e.offset) for e in read.events] == [("a/b", 1)]
    assert [(r.id, r.offset) for r in repeat.value.events] == [(read.events[0].id, 1)]


# Over HTTP: the Idempotency-Key of POST /events and the webhook's event id.


async def test_idempotency_key_answers_a_repeat_with_the_first_events(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A publish repeated with its key is answered with the first events and
    delivers nothing new; the key with another body gets 422, a bad key 400."""
    topic = f"tests/once/{uuid.uuid4().hex[:8]}"
    items = [event(topic, 1), event(topic, 2)]
    with running_gateway(tmp_path) as gateway:
        async with ws_client(gateway) as client:
            await client.subscribe(topic)
            key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
            first = await _publish(http, gateway, items, key)
            again = await _publish(http, gateway, items, key)
            other_body = await _publish(http, gateway, items[:1], key)
            bad = await _publish(http, gateway, items, {"Idempotency-Key": "a b"})
            fresh = await _publish(http, gateway, items[:1], {"Idempotency-Key": "n"})
            received = await client.events(3)
            await client.expect_silence(0.3)
        assert_no_error_logged(gateway)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert (other_body.status_code, other_body.json()["error"]["code"]) == (
        422,
        "idempotency_key_reused",
    )
    assert (bad.status_code, bad.json()["error"]["code"]) == (
        400,
        "bad_idempotency_key",
    )
    assert [m["offset"] for m in received] == [1, 2, 3]
    assert fresh.json()["events"][0]["offset"] == 3


@pytest.mark.timeout(90)
async def test_retries_after_lost_answers_publish_once(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Redis takes a publish and a webhook delivery but their answers are lost:
    both get 503, and their retries (same Idempotency-Key, same event id) are
    answered as repeats, so the topic holds each event once."""
    server = RedisServer(tmp_path)
    server.start()
    proxy = SilentProxy(server.port)
    await proxy.start()
    redis_url = f"redis://127.0.0.1:{proxy.port}/0"
    # Started and stopped in a thread: the proxy runs on this event loop.
    gateway = await asyncio.to_thread(
        start_gateway, tmp_path, redis_url=redis_url, webhook_secret=SECRET
    )
    try:
        topic = "tests/once/lost"
        # Load the publish script first, then a publish is one EVALSHA; and open
        # several pooled connections, since only those open before the answers
        # are dropped can send a request (a new one needs answers to connect).
        warm = [_publish(http, gateway, [event("tests/warm")], {}) for _ in range(4)]
        assert all(answer.is_success for answer in await asyncio.gather(*warm))
        body = orjson.dumps(payload())
        key = {"Idempotency-Key": "lost-1"}
        proxy.drop_replies()
        # At once: a pooled connection idle for 5 s is checked with a PING first,
        # and a lost PING would stop the request before it is sent.
        lost = await asyncio.gather(
            _publish(http, gateway, [event(topic, 1)], key),
            deliver(http, gateway, body, sign(body)),
        )
        proxy.pass_replies()
        publish_retry = await _until_answered(
            lambda: _publish(http, gateway, [event(topic, 1)], key)
        )
        webhook_retry = await _until_answered(
            lambda: deliver(http, gateway, body, sign(body))
        )
        polled = await http.get(f"{gateway.http_url}/topics/{topic}/events")
        fixture = await http.get(
            f"{gateway.http_url}/topics/fixtures/2022-12-18/ARG-FRA/events"
        )
    finally:
        await asyncio.to_thread(gateway.stop)
        await proxy.close()
        server.stop()
    assert [answer.status_code for answer in lost] == [503, 503]
    assert publish_retry.headers["Idempotent-Replayed"] == "true"
    assert publish_retry.json()["events"][0]["offset"] == 1
    assert webhook_retry.json()["duplicate"] is True
    assert [e["offset"] for e in polled.json()["events"]] == [1]
    assert len(fixture.json()["events"]) == 1


async def _publish(
    http: httpx.AsyncClient,
    gateway: Gateway,
    items: list[dict[str, Any]],
    headers: dict[str, str],
) -> httpx.Response:
    return await http.post(
        f"{gateway.http_url}/events",
        json=items,
        headers={"Authorization": f"Bearer {API_KEY}", **headers},
    )


async def _until_answered(
    send: Callable[[], Awaitable[httpx.Response]],
) -> httpx.Response:
    """Send until the answer is not 503 (while the gateway reconnects to Redis)."""
    deadline = time.monotonic() + timeout(30)
    while True:
        response = await send()
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.2)
