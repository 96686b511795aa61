"""Shared state behind one interface: the in-memory backend and the Redis backend."""

from gateway.state.base import (
    ConnectionRecord,
    EventListener,
    HistoryRead,
    StateBackend,
    TopicStats,
)
from gateway.state.memory import MemoryBackend

__all__ = [
    "ConnectionRecord",
    "EventListener",
    "HistoryRead",
    "MemoryBackend",
    "StateBackend",
    "TopicStats",
]
