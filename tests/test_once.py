"""Publishing at most once per key, on both backends, through a Redis freeze."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import REDIS_URL
from services import RedisServer, SilentProxy

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
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[StateBackend]:
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
    backend: StateBackend,
) -> None:
    """The second publish with a key stores nothing and names the first's events
    and fingerprint; another key publishes."""
    once = Once(f"k-{uuid.uuid4().hex}", "body-hash", ttl=60)
    first = await backend.publish(DRAFTS, max_bytes=10_000, once=once)
    with pytest.raises(AlreadyPublished) as repeat:
        await backend.publish(DRAFTS[:1], max_bytes=10_000, once=once)
    other = await backend.publish(
        DRAFTS[:1], max_bytes=10_000, once=Once(f"k-{uuid.uuid4().hex}", "", ttl=60)
    )
    assert [(r.id, r.topic, r.offset) for r in repeat.value.events] == [
        (e.id, e.topic, e.offset) for e in first
    ]
    assert repeat.value.fingerprint == "body-hash"
    read = await backend.read_history("a/b", 0, 10)
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
        with pytest.raises(AlreadyPublished) as repeat:
            await backend.publish(DRAFTS[:1], max_bytes=10_000, once=once)
        read = await backend.read_history("a/b", 0, 10)
    finally:
        await backend.close()
        await proxy.close()
        server.stop()
    assert [(e.topic, e.offset) for e in read.events] == [("a/b", 1)]
    assert [(r.id, r.offset) for r in repeat.value.events] == [(read.events[0].id, 1)]
