"""The monthly AWS bill of each strategy, from list prices in ``data/aws_prices.json``.

The model counts only what each managed service bills per use, for ``users``
clients that each receive every event of a stream of ``events_per_second``:

- polling on API Gateway HTTP APIs: one request per client per interval, whether
  or not anything changed, each counted once per started 512 KB of response;
- WebSocket push on API Gateway WebSocket APIs: one message per event per
  connected client, counted once per started 32 KB, and connection minutes for
  every client all month;
- MQTT push on AWS IoT Core: one inbound message per event (the gateway's
  publish) and one outbound per subscriber, counted once per started 5 KB, and
  connection minutes for every client all month.

Tiers are applied to the month's total, as AWS does per account and region.
Left out: free tiers, data transfer, the compute that produces events, and
keepalive traffic (API Gateway and IoT Core do not bill pings). A month is
``hours_per_month`` (730) hours of constant load. The result is an estimate at
list prices, good to a few per cent at best; read it for orders of magnitude.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

__all__ = ["MonthlyCost", "load_prices", "monthly_costs", "tiered"]


def load_prices() -> dict[str, Any]:
    """The price file shipped with the package."""
    text = resources.files("clients").joinpath("data/aws_prices.json").read_text()
    prices: dict[str, Any] = json.loads(text)
    return prices


def tiered(quantity: float, tiers: list[list[float | None]], unit: float) -> float:
    """The price of ``quantity`` under cumulative tiers of ``[up_to, price]``.

    ``up_to`` is the quantity where a tier ends (None: no end); ``price`` is per
    ``unit`` of quantity.
    """
    total = 0.0
    start = 0.0
    for up_to, price in tiers:
        assert price is not None
        end = math.inf if up_to is None else up_to
        if quantity > start:
            total += (min(quantity, end) - start) / unit * price
        start = end
    return total


@dataclass(frozen=True)
class MonthlyCost:
    """One strategy's month: what is billed and what it costs, in USD."""

    strategy: str
    billed_messages: float
    connection_minutes: float
    messages_usd: float
    connections_usd: float

    @property
    def total_usd(self) -> float:
        """The month's bill."""
        return self.messages_usd + self.connections_usd

    def as_dict(self) -> dict[str, float | str]:
        """Every figure, the total included."""
        return {**asdict(self), "total_usd": self.total_usd}


def monthly_costs(
    users: int,
    events_per_second: float,
    *,
    poll_interval: float,
    event_bytes: int = 300,
    poll_response_bytes: int | None = None,
    prices: dict[str, Any] | None = None,
) -> dict[str, MonthlyCost]:
    """The bill of each strategy (``poll``, ``ws``, ``mqtt``) for one month.

    Args:
        users: clients connected (or polling) all month.
        events_per_second: events each client receives per second.
        poll_interval: seconds between two polls of one client.
        event_bytes: size of one event message.
        poll_response_bytes: size of one poll answer; by default the events of
            one interval plus 500 bytes of headers and wrapper.
        prices: a price table like the shipped file's; that file by default.
    """
    prices = prices or load_prices()
    seconds = prices["hours_per_month"] * 3600
    minutes = users * seconds / 60
    million = 1_000_000
    if poll_response_bytes is None:
        poll_response_bytes = int(events_per_second * poll_interval * event_bytes) + 500

    http = prices["http_api"]
    polls = users * seconds / poll_interval
    requests = polls * math.ceil(poll_response_bytes / http["request_increment_bytes"])
    ws = prices["websocket_api"]
    events = events_per_second * seconds
    ws_messages = (
        users * events * math.ceil(event_bytes / ws["message_increment_bytes"])
    )
    iot = prices["iot_core"]
    iot_messages = (users + 1) * events
    iot_messages *= math.ceil(event_bytes / iot["message_increment_bytes"])
    return {
        "poll": MonthlyCost(
            "poll",
            requests,
            0.0,
            tiered(requests, http["requests_per_million"], million),
            0.0,
        ),
        "ws": MonthlyCost(
            "ws",
            ws_messages,
            minutes,
            tiered(ws_messages, ws["messages_per_million"], million),
            minutes / million * ws["connection_minutes_per_million"],
        ),
        "mqtt": MonthlyCost(
            "mqtt",
            iot_messages,
            minutes,
            tiered(iot_messages, iot["messages_per_million"], million),
            minutes / million * iot["connection_minutes_per_million"],
        ),
    }
