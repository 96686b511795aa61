"""Runtime behaviour that needs no socket: background failures and batch publishing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.config import Settings
from gateway.errors import TooLarge
from gateway.events.envelope import Draft, Event
from gateway.runtime import Runtime
from gateway.state.memory import MemoryBackend


async def test_failed_background_task_logs_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A crash in background work is an ERROR record carrying the exception."""
    runtime = Runtime(Settings(), MemoryBackend())

    async def crash() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="gateway.runtime"):
        runtime.spawn(crash(), "test work")
        for _ in range(10):
            await asyncio.sleep(0)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "test work failed" in record.message
    assert record.exc_info is not None and str(record.exc_info[1]) == "boom"


async def test_batch_with_an_oversized_event_publishes_nothing() -> None:
    """All or none: an event over the size limit leaves no offset used."""
    backend = MemoryBackend(history_size=10)
    seen: list[Event] = []
    backend.set_listener(seen.append)
    small = Draft("a/b", "s", "X_HAPPENED", {})
    big = Draft("a/b", "s", "X_HAPPENED", {"blob": "x" * 2000})
    with pytest.raises(TooLarge):
        await backend.publish([small, big], max_bytes=1000)
    assert seen == []
    (event,) = await backend.publish([small], max_bytes=1000)
    assert event.offset == 1 and seen == [event]


async def test_history_is_capped_and_read_after_an_offset() -> None:
    """History keeps the newest events; reads start after the given offset."""
    backend = MemoryBackend(history_size=3)
    draft = Draft("a/b", "s", "X_HAPPENED", {})
    await backend.publish([draft] * 5, max_bytes=1000)
    read = await backend.read_history("a/b", 3, 10)
    assert [e.offset for e in read.events] == [4, 5]
    assert (read.first_offset, read.last_offset) == (3, 5)
    read = await backend.read_history("a/b", 0, 10)
    assert [e.offset for e in read.events] == [3, 4, 5]
    empty = await backend.read_history("nothing", 0, 10)
    assert (list(empty.events), empty.first_offset, empty.last_offset) == ([], 0, 0)
