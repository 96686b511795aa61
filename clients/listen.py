"""``gateway listen``: print each event of some topics with its delay since publish."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from datetime import datetime

import orjson

from clients.strategies import Event, SubscribeError, make_subscriber

__all__ = ["format_event", "listen"]


def format_event(event: Event) -> str:
    """One line: receipt time, topic, offset, type, delay in ms, details."""
    at = datetime.fromtimestamp(event.received_at).strftime("%H:%M:%S.%f")[:-3]
    details = orjson.dumps(event.details).decode()
    return (
        f"{at}  {event.topic}  #{event.offset}  {event.event_type}  "
        f"delay {1000 * event.delay():,.1f} ms  {details}"
    )


async def _listen(
    via: str,
    topics: Sequence[str],
    *,
    url: str,
    mqtt_url: str,
    poll_interval: float | None,
    count: int | None,
) -> int:
    subscriber = make_subscriber(
        via, topics, url=url, mqtt_url=mqtt_url, poll_interval=poll_interval
    )
    where = mqtt_url if via == "mqtt" else url
    async with subscriber:
        print(f"listening to {', '.join(topics)} via {via} at {where}", file=sys.stderr)
        seen = 0
        async for event in subscriber:
            print(format_event(event), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    return 0


def listen(
    via: str,
    topics: Sequence[str],
    *,
    url: str,
    mqtt_url: str,
    poll_interval: float | None = None,
    count: int | None = None,
) -> int:
    """Print events until interrupted (or ``count`` of them); return the status.

    Raises:
        ValueError: a URL or topic does not fit the strategy.
    """
    try:
        return asyncio.run(
            _listen(
                via,
                topics,
                url=url,
                mqtt_url=mqtt_url,
                poll_interval=poll_interval,
                count=count,
            )
        )
    except KeyboardInterrupt:
        return 130
    except (SubscribeError, TimeoutError, OSError) as exc:
        with contextlib.suppress(BrokenPipeError):
            print(f"gateway listen: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
