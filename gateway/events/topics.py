"""Topic names and topic filters: grammar, validation and matching.

A topic is a path of levels separated by ``/``, such as ``stocks/AAPL`` or
``fixtures/2022-12-18/ARG-FRA``. The same name is used on WebSocket and on MQTT.
A topic filter may also hold the MQTT wildcards ``+`` (exactly one level) and ``#``
(the rest of the path, as the last level only).
"""

from __future__ import annotations

import re
from functools import lru_cache

from gateway.errors import BadTopic

__all__ = [
    "DEFAULT_MAX_TOPIC_DEPTH",
    "DEFAULT_MAX_TOPIC_LENGTH",
    "filter_matches",
    "is_wildcard",
    "validate_filter",
    "validate_topic",
]

DEFAULT_MAX_TOPIC_LENGTH = 256
DEFAULT_MAX_TOPIC_DEPTH = 8

# One level: letters, digits and a few punctuation marks that are safe in URLs,
# MQTT topics and Redis keys alike. Levels made only of dots are refused so that a
# topic can never look like a relative path.
_LEVEL = re.compile(r"[A-Za-z0-9_\-.:@=]{1,64}")


def _check_level(level: str, name: str) -> None:
    if not level:
        raise BadTopic(f"empty level in {name!r}")
    if not _LEVEL.fullmatch(level) or level.strip(".") == "":
        raise BadTopic(f"bad level {level[:70]!r} in topic {name[:300]!r}")


def _check_shape(name: object, max_length: int, max_depth: int) -> list[str]:
    if not isinstance(name, str):
        raise BadTopic(f"topic must be a string, not {type(name).__name__}")
    if not name:
        raise BadTopic("empty topic")
    if len(name) > max_length:
        raise BadTopic(f"topic longer than {max_length} characters")
    levels = name.split("/")
    if len(levels) > max_depth:
        raise BadTopic(f"topic {name!r} deeper than {max_depth} levels")
    return levels


def validate_topic(
    name: object,
    *,
    max_length: int = DEFAULT_MAX_TOPIC_LENGTH,
    max_depth: int = DEFAULT_MAX_TOPIC_DEPTH,
) -> str:
    """Check a topic name that events are published on.

    Args:
        name: the candidate, as decoded from JSON.
        max_length: longest accepted name, in characters.
        max_depth: most levels accepted.

    Returns:
        The name, unchanged.

    Raises:
        BadTopic: the name breaks the grammar; the message says where.
    """
    levels = _check_shape(name, max_length, max_depth)
    assert isinstance(name, str)
    for level in levels:
        _check_level(level, name)
    return name


def validate_filter(
    name: object,
    *,
    max_length: int = DEFAULT_MAX_TOPIC_LENGTH,
    max_depth: int = DEFAULT_MAX_TOPIC_DEPTH,
) -> str:
    """Check a topic filter that a client subscribes to.

    Args:
        name: the candidate, as decoded from JSON.
        max_length: longest accepted filter, in characters.
        max_depth: most levels accepted.

    Returns:
        The filter, unchanged.

    Raises:
        BadTopic: the filter breaks the grammar; the message says where.
    """
    levels = _check_shape(name, max_length, max_depth)
    assert isinstance(name, str)
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "+":
            continue
        if level == "#":
            if index != last:
                raise BadTopic(f"'#' must be the last level in {name!r}")
            continue
        _check_level(level, name)
    return name


def is_wildcard(topic_filter: str) -> bool:
    """Tell whether a valid filter holds ``+`` or ``#``."""
    return "+" in topic_filter or "#" in topic_filter


@lru_cache(maxsize=65536)
def filter_matches(topic_filter: str, topic: str) -> bool:
    """Tell whether a valid filter matches a valid topic name.

    ``#`` also matches its parent level, as in MQTT: ``stocks/#`` matches ``stocks``.
    """
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)
