"""Read permissions on topics, checked on filters by what they could match.

A right is a topic filter such as ``stocks/#``. A subscription is allowed when one
right covers it: every topic the subscription could ever match is matched by that
right. So ``stocks/+`` is allowed by ``stocks/#``, while ``#`` or ``+/AAPL`` are
not, since they could match topics outside ``stocks``. The check never grants more
than the rights say; it may refuse a filter that only several rights together
would cover.

Job topics are the exception: ``jobs/<id>`` with the full id is readable by whoever
holds the id (it is the job's valet key), and by no wildcard unless a right covers
it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ReadRights", "filter_covers", "is_job_topic"]


def filter_covers(right: str, topic_filter: str) -> bool:
    """Whether every topic ``topic_filter`` can match is matched by ``right``."""
    rights = right.split("/")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if index >= len(rights):
            return False
        allowed = rights[index]
        if allowed == "#":
            # '#' is a wildcard only as the last level; a right holding it
            # elsewhere (a token's 'stocks/#/x') breaks the grammar and covers
            # nothing, rather than the whole tree above it.
            return index == len(rights) - 1
        if level == "#":
            # The filter reaches any depth from here; only '#' covers that.
            return False
        if allowed == "+":
            continue
        if level == "+" or level != allowed:
            return False
    # The filter ended; the right must not ask for more levels, except that
    # 'a/#' also matches 'a' itself.
    rest = rights[len(levels) :]
    return not rest or rest == ["#"]


def is_job_topic(topic_filter: str) -> bool:
    """``jobs/<id>`` with a full id and no wildcard."""
    levels = topic_filter.split("/")
    return (
        len(levels) == 2
        and levels[0] == "jobs"
        and levels[1] != ""
        and "+" not in levels[1]
        and "#" not in levels[1]
    )


@dataclass(frozen=True, slots=True)
class ReadRights:
    """The topic filters one client may subscribe to."""

    filters: tuple[str, ...]

    @classmethod
    def parse(cls, text: str | Iterable[str]) -> ReadRights:
        """Rights from a comma-separated text or a list of filters."""
        items = text.split(",") if isinstance(text, str) else text
        return cls(tuple(item.strip() for item in items if item.strip()))

    def allows(self, topic_filter: str) -> bool:
        """Whether a subscription to ``topic_filter`` is allowed.

        A filter that could match job topics (``jobs/+``, ``+/x``, ``#``) needs,
        besides a right that covers it, a right that names the ``jobs`` tree
        itself and covers its part of it: ``#`` alone does not hand out every
        job's valet key.
        """
        if is_job_topic(topic_filter):
            return True
        if not any(filter_covers(right, topic_filter) for right in self.filters):
            return False
        jobs_part = _jobs_part(topic_filter)
        if jobs_part is None:
            return True
        return any(
            right.split("/", 1)[0] == "jobs" and filter_covers(right, jobs_part)
            for right in self.filters
        )


def _jobs_part(topic_filter: str) -> str | None:
    """The filter restricted to the ``jobs`` tree, or None if it cannot reach it."""
    first, _, rest = topic_filter.partition("/")
    if first == "#":
        return "jobs/#"
    if first not in ("jobs", "+"):
        return None
    return f"jobs/{rest}" if rest else "jobs"
