"""The cost model's arithmetic against figures worked out by hand."""

from __future__ import annotations

import pytest

from clients.cost import load_prices, monthly_costs, tiered


def test_tiers_apply_to_the_total() -> None:
    """Each tier prices only the part of the quantity that falls in it."""
    tiers: list[list[float | None]] = [[10, 2.0], [30, 1.0], [None, 0.5]]
    assert tiered(5, tiers, 1) == 10
    assert tiered(25, tiers, 1) == 20 + 15
    assert tiered(50, tiers, 1) == 20 + 20 + 10


def test_thousand_users_ten_events_a_second() -> None:
    """1,000 users, 10 events/s, 1 s polling, 730 h, events of 300 bytes.

    Seconds in the month: 730 * 3600 = 2,628,000.
    Polling: 1,000 * 2,628,000 = 2.628e9 requests (answers of 3.5 KB, one
    512 KB unit each): 300 M at $1.00/M + 2,328 M at $0.90/M = $2,395.20.
    WebSocket: 1,000 * 10 * 2,628,000 = 26.28e9 messages: 1,000 M at $1.00/M +
    25,280 M at $0.80/M = $21,224.00; 1,000 * 43,800 = 43.8 M connection
    minutes at $0.25/M = $10.95.
    IoT Core: 1,001 * 26,280,000 = 26,306.28 M messages: 1,000 M * $1.00 +
    4,000 M * $0.80 + 21,306.28 M * $0.70 = $19,114.396; 43.8 M minutes at
    $0.08/M = $3.504.
    """
    costs = monthly_costs(1000, 10, poll_interval=1, event_bytes=300)
    assert costs["poll"].billed_messages == 2.628e9
    assert costs["poll"].total_usd == pytest.approx(2395.20)
    assert costs["ws"].billed_messages == 26.28e9
    assert costs["ws"].messages_usd == pytest.approx(21224.00)
    assert costs["ws"].connections_usd == pytest.approx(10.95)
    assert costs["mqtt"].messages_usd == pytest.approx(19114.396)
    assert costs["mqtt"].connections_usd == pytest.approx(3.504)
    assert costs["mqtt"].total_usd == pytest.approx(19117.90)


def test_size_increments_multiply_billed_units() -> None:
    """A 40 KB event is two WebSocket messages and eight IoT Core messages.

    100 users, 0.01 events/s, 60 s polling: 26,280 events a month.
    WebSocket: 100 * 26,280 * 2 = 5.256 M messages = $5.256.
    IoT Core: 101 * 26,280 * 8 = 21,234,240 messages = $21.23424.
    Polling: 100 * 43,800 polls of about 24.5 KB: 4.38 M requests = $4.38.
    """
    costs = monthly_costs(100, 0.01, poll_interval=60, event_bytes=40 * 1024)
    assert costs["ws"].messages_usd == pytest.approx(5.256)
    assert costs["mqtt"].messages_usd == pytest.approx(21.23424)
    assert costs["poll"].messages_usd == pytest.approx(4.38)


def test_price_file_names_its_date_and_sources() -> None:
    """The shipped prices say when they were taken and where from."""
    prices = load_prices()
    assert prices["taken_on"] and prices["region"] == "us-east-1"
    for service in ("http_api", "websocket_api", "iot_core"):
        assert prices[service]["source"].startswith("https://aws.amazon.com/")
